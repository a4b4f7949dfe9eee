"""Consistent-hash ring: lookups, walks, and how many keys move when membership changes.

Stated tolerance: with 128 virtual nodes and 2,000 keys, the fraction of keys that move when a
worker joins N others (or one of N+1 leaves) has a standard deviation of about 0.1/(N+1) across
rings; each ring must land within +-50% of 1/(N+1) (over 4 sigma) and the mean over rings within 5%.
"""
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policies.hash_ring import HashRing


def ring_of(n, seed=0, vnodes=128):
    ring = HashRing(vnodes, seed)
    for i in range(n):
        ring.add(f"w{i}")
    return ring


def random_keys(seed, count=2000):
    rnd = random.Random(seed)
    return [rnd.getrandbits(64) for _ in range(count)]


def moved_on_add(n, seed):
    ring, keys = ring_of(n, seed), random_keys(seed)
    before = [ring.owner(k) for k in keys]
    ring.add("new")
    after = [ring.owner(k) for k in keys]
    assert all(a == b or a == "new" for a, b in zip(after, before, strict=True)), "keys may only move to the new worker"
    return sum(a != b for a, b in zip(after, before, strict=True)) / len(keys)


def moved_on_remove(n, seed):
    ring, keys = ring_of(n + 1, seed), random_keys(seed)
    before = [ring.owner(k) for k in keys]
    ring.remove(f"w{n}")
    after = [ring.owner(k) for k in keys]
    assert all(a == b for a, b in zip(after, before, strict=True) if b != f"w{n}"), \
        "only the removed worker's keys move"
    return sum(a != b for a, b in zip(after, before, strict=True)) / len(keys)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**32))
def test_adding_a_worker_moves_about_one_in_n_plus_one_keys(n, seed):
    assert moved_on_add(n, seed) == pytest.approx(1 / (n + 1), rel=0.5)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**32))
def test_removing_a_worker_moves_only_its_keys_about_one_in_n_plus_one(n, seed):
    assert moved_on_remove(n, seed) == pytest.approx(1 / (n + 1), rel=0.5)


def test_remap_fraction_averages_one_in_n_over_many_rings():
    fractions = [moved_on_add(4, seed) * 5 for seed in range(100)]
    assert statistics.mean(fractions) == pytest.approx(1.0, abs=0.05)
    assert max(fractions) < 1.5  # adding a 5th worker remaps at most about 1/5 of prefixes


def test_walk_visits_each_worker_once_starting_at_the_owner():
    ring = ring_of(6)
    for key in random_keys(1, 50):
        order = list(ring.walk(key))
        assert order[0] == ring.owner(key)
        assert sorted(order) == sorted(ring.members)


def test_same_key_same_owner_across_ring_instances():
    keys = random_keys(2, 100)
    a, b = ring_of(5), ring_of(5)
    assert [a.owner(k) for k in keys] == [b.owner(k) for k in keys]


def test_empty_ring_has_no_owner():
    with pytest.raises(LookupError):
        HashRing().owner(1)
    assert list(HashRing().walk(1)) == []


def test_order_is_the_whole_walk_from_every_position_and_follows_membership_changes():
    ring = HashRing(vnodes=8)
    rng = random.Random(7)
    for step, change in enumerate(["a", "b", "c", "-b", "d", "-a"]):
        ring.remove(change[1:]) if change.startswith("-") else ring.add(change)
        keys = [rng.getrandbits(64) for _ in range(300)] + ring._points + [0, 2**64 - 1]
        for key in keys:
            assert ring.order(key) == tuple(ring.walk(key)), (step, key)

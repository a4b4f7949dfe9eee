"""The planner's queueing and distribution helpers against textbook closed forms and a simulation."""
import math

import numpy as np
import pytest

from emulator.planner import dist, queueing
from emulator.planner.inputs import LengthDist


def test_erlang_c_one_server_waits_with_probability_rho():
    assert queueing.erlang_c(1, 0.7) == pytest.approx(0.7)


def test_erlang_c_two_servers_one_erlang_is_one_third():
    # C(2, a=1) = (a^2/2! x 2/(2-a)) / (1 + a + a^2/2! x 2/(2-a)) = 1 / 3
    assert queueing.erlang_c(2, 1.0) == pytest.approx(1 / 3)


def test_pollaczek_khinchine_is_mm1_for_exponential_service():
    # M/M/1, mu = 10, lam = 7: W = rho / (mu - lam) = 0.7 / 3; E[S^2] = 2 / mu^2
    assert queueing.pk_wait(7.0, 0.1, 2 * 0.01) == pytest.approx(0.7 / 3)


def test_kingman_and_allen_cunneen_reduce_to_poisson_exponential_forms():
    assert queueing.kingman_wait(7.0, 0.1, 1.0, 1.0) == pytest.approx(0.7 / 3)
    # M/M/2 at a = 1 Erlang, mu = 1: W = C / (c mu - lam) = (1/3) / 1
    assert queueing.allen_cunneen_wait(2, 1.0, 1.0, 1.0, 1.0) == pytest.approx(1 / 3)
    # deterministic service halves the Poisson wait (cs2 = 0)
    assert queueing.kingman_wait(7.0, 0.1, 1.0, 0.0) == pytest.approx(0.7 / 3 / 2)


def test_benes_law_has_the_pollaczek_khinchine_mean_and_atom():
    # M/D/1, S = 1, rho = 0.6: P(W = 0) = 0.4 and E[W] = rho S / (2 (1 - rho)) = 0.75
    h, cells = 0.01, 8192
    pmf = queueing.mg1_wait_pmf(np.array([1.0]), np.array([1.0]), 0.6, h, cells)
    assert pmf[0] == pytest.approx(0.4, abs=0.01)
    assert float(pmf @ (np.arange(cells) * h)) == pytest.approx(0.75, rel=0.02)


def test_benes_p99_matches_a_lindley_simulation_of_mg1():
    # Two-point service (0.1 s w.p. 0.9, 1.0 s w.p. 0.1): E[S] = 0.19 s, so lam = 3/s gives rho = 0.57
    rng = np.random.default_rng(1)
    n, lam = 200_000, 3.0
    s = np.where(rng.random(n) < 0.9, 0.1, 1.0)
    a = rng.exponential(1 / lam, n)
    w = np.zeros(n)
    for i in range(1, n):  # Lindley: W_i = max(0, W_{i-1} + S_{i-1} - A_i)
        w[i] = max(0.0, w[i - 1] + s[i - 1] - a[i])
    h, cells = 0.002, 8192
    pmf = queueing.mg1_wait_pmf(np.array([0.1, 1.0]), np.array([0.9, 0.1]), lam * 0.19, h, cells)
    assert dist.grid_quantile(pmf, h, 0.99) == pytest.approx(np.quantile(w, 0.99), rel=0.05)
    assert dist.grid_quantile(pmf, h, 0.9) == pytest.approx(np.quantile(w, 0.9), rel=0.05)


def test_exceptional_first_service_law_matches_a_lindley_simulation():
    # A short prompt costs 0.1 s when it starts a busy period (its step alone) and 0.02 s when it is
    # packed into a backlog (w.p. 0.9); a long one 1.0 s either way. lam = 2/s: rho = 2 x 0.118.
    rng = np.random.default_rng(2)
    n, lam = 200_000, 2.0
    long = rng.random(n) < 0.1
    packed, alone = np.where(long, 1.0, 0.02), np.where(long, 1.0, 0.1)
    a = rng.exponential(1 / lam, n)
    w = np.zeros(n)
    for i in range(1, n):  # Lindley, with the alone service for whoever found the server idle
        w[i] = max(0.0, w[i - 1] + (alone[i - 1] if w[i - 1] == 0.0 else packed[i - 1]) - a[i])
    h, cells = 0.002, 8192
    kinds, weights = np.array([0.02, 1.0]), np.array([0.9, 0.1])
    first = queueing.first_service_delay_pmf(kinds, np.array([0.1, 1.0]), weights, lam, h, cells)
    pmf = queueing.mg1_wait_pmf(kinds, weights, lam * 0.118, h, cells, extra=first)
    # P(W = 0) = (1 - rho) / (1 - rho + lam E[S0]) (Welch), not 1 - lam E[S0] = 0.62
    assert pmf[0] == pytest.approx((1 - 0.236) / (1 - 0.236 + 0.38), abs=0.01)
    assert pmf[0] == pytest.approx(np.mean(w == 0.0), abs=0.01)
    mean = queueing.pk_wait(lam, 0.118, 0.9 * 0.02 ** 2 + 0.1) + queueing.first_service_delay_mean(
        kinds, np.array([0.1, 1.0]), weights, lam)
    assert float(pmf @ (np.arange(cells) * h)) == pytest.approx(mean, rel=0.02)
    assert mean == pytest.approx(np.mean(w), rel=0.05)
    assert dist.grid_quantile(pmf, h, 0.99) == pytest.approx(np.quantile(w, 0.99), rel=0.05)
    assert dist.grid_quantile(pmf, h, 0.9) == pytest.approx(np.quantile(w, 0.9), rel=0.05)


def test_lognormal_points_keep_the_mean_and_fit_the_tail():
    # mean 1000, p99 4000: ln(4) = 2.326 sigma - sigma^2 / 2 -> sigma = 0.673
    pts = LengthDist(mean=1000, p99=4000).points()
    assert pts.mean() == pytest.approx(1000, rel=1e-6)
    assert pts.quantile(0.99) == pytest.approx(4000, rel=0.05)
    assert pts.quantile(0.5) == pytest.approx(1000 * math.exp(-0.673 ** 2 / 2), rel=0.03)


def test_poisson_points_have_poisson_moments():
    pts = dist.poisson(50.0)
    assert pts.mean() == pytest.approx(50.0, rel=1e-3)
    assert pts.moment2() - pts.mean() ** 2 == pytest.approx(50.0, rel=0.05)


def test_slot_waits_with_a_constant_step_time_are_erlang_c():
    # With ITL fixed, each of n running sequences finishes at rate 1 / (steps x ITL): the running
    # count is M/M/c with c = max_num_seqs servers. 30 arrivals/s, 100 steps of 50 ms (5 s each):
    # offered load a = 150 on c = 160 slots. Erlang B by recursion, then C = B / (1 - rho (1 - B)).
    from emulator.planner import seq_slots
    c, a, mu = 160, 150.0, 0.2
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    erlang_c = b / (1 - (a / c) * (1 - b))
    wait = seq_slots.wait(rate=30.0, steps=100.0, itl=lambda n: 0.05, cap=c)
    assert 1 - wait.weights[0] == pytest.approx(erlang_c, rel=1e-6)
    assert float(wait.values @ wait.weights) == pytest.approx(erlang_c / (c * mu - 30.0), rel=1e-6)
    assert seq_slots.wait(rate=30.0, steps=100.0, itl=lambda n: 0.05, cap=150) is None   # a = c: no steady state


@pytest.mark.parametrize("mu", [0.01, 0.3, 1.0, 3.0, 30.0])
def test_capped_arrivals_of_one_size_are_the_poisson_sum(mu):
    # Every arrival brings 200 tokens: E[min(r, 200 N)], N ~ Poisson(mu), summed term by term.
    arrivals = queueing.CappedArrivals(np.array([200.0]), np.array([1.0]), 1024)
    n = np.arange(200)
    pn = np.exp(-mu + n * math.log(mu) - np.array([math.lgamma(k + 1) for k in n]))
    for room in (100, 500, 1024):
        exact = float(pn @ np.minimum(room, 200 * n))
        assert arrivals.mean(np.array([mu]), np.array([room]))[0] == pytest.approx(exact, rel=0.01), room


def test_capped_arrivals_of_mixed_sizes_match_sampled_ones():
    # Rare arrivals pack mu x E[min(r, S)], not min(r, mu E[S]) (a fluid flow fills r as soon as its
    # mean does: at mu = 0.3 and r = 1,024 that is 1,024 tokens where 138 arrive on average).
    sizes, weights = np.array([48.0, 296, 904, 2496, 6000]), np.array([0.3, 0.3, 0.2, 0.15, 0.05])
    arrivals = queueing.CappedArrivals(sizes, weights, 1024)
    rng = np.random.default_rng(3)
    for mu in (0.3, 1.0, 3.0):
        counts = rng.poisson(mu, 40_000)
        x = np.array([rng.choice(sizes, k, p=weights).sum() for k in counts])
        for room in (100, 1024):
            sampled = float(np.minimum(room, x).mean())
            assert arrivals.mean(np.array([mu]), np.array([room]))[0] == pytest.approx(sampled, rel=0.03), (mu, room)
    assert arrivals.mean(np.array([0.3]), np.array([1024]))[0] < 150

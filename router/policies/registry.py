"""Policy names to constructors, and ``PolicySet``: what a router or simulator holds.

    policies = PolicySet.from_settings({
        "policy": "prefix_bounded",                       # the default
        "policies": {"prefix_bounded": {"eps": 0.25}, "kv_aware": {"load_weight": 0.5}},
        "kv_index": {"rehash": False, "block_size": 16},  # the shared index kv_aware and pd_pair read
    })
    policies.index.apply(worker_id, batch)                # feed KV events as they arrive
    decision = policies.choose(request, workers)          # request.policy, if set, overrides the default
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from emulator.physics import steptime
from emulator.spec import ClusterSpec, SpecError
from kvlab.wire.user_errors import unknown_name
from router.policies.base import Decision, Policy, RouteRequest, WorkerView
from router.policies.bounded_load import PrefixBounded
from router.policies.kv_aware import KvAware
from router.policies.kv_index import KvIndex
from router.policies.least_loaded import LeastLoaded
from router.policies.pd_pair import PdPair
from router.policies.prefix_ring import PrefixRing
from router.policies.round_robin import RoundRobin
from router.policies.slo_aware import SloAware
from router.policies.slo_table import SloTable

Settings = Mapping[str, Any]


def _pd_pair(index: KvIndex, prefill: Settings | None = None, decode: Settings | None = None,
             **settings: Any) -> PdPair:
    prefill = dict(prefill or {"policy": "prefix_bounded"})
    decode = dict(decode or {"policy": "kv_aware"})
    return PdPair(build_policy(prefill.pop("policy"), prefill, index=index),
                  build_policy(decode.pop("policy"), decode, index=index), index=index, **settings)


BUILDERS: dict[str, Callable[..., Policy]] = {
    "round_robin": lambda index, **s: RoundRobin(**s),
    "least_loaded": lambda index, **s: LeastLoaded(**s),
    "prefix_ring": lambda index, **s: PrefixRing(**s),
    "prefix_bounded": lambda index, **s: PrefixBounded(index=index, **s),
    "kv_aware": lambda index, **s: KvAware(index, **s),
    "pd_pair": _pd_pair,
    "slo_aware": lambda index, **s: SloAware(index, **s),
}
NEEDS_TABLE = frozenset({"slo_aware"})   # built with the spec's roofline table (router.policies.slo_table)


def host_credit(spec: ClusterSpec) -> float | None:
    """What a block in a worker's host memory is worth to kv_aware against one in HBM, from the spec's
    roofline and host link (emulator.physics.steptime.host_hit_credit); None when the spec has no host tier."""
    if spec.engine.host_kv_gb <= 0:
        return None
    prompt_pools = [p for p in spec.pools if p.role != "decode"]
    return min(steptime.host_hit_credit(spec.deployment(p), spec.host_swap_link(), spec.engine.max_num_batched_tokens)
               for p in prompt_pools)


def build_policy(name: str, settings: Settings | None = None, *, index: KvIndex | None = None,
                 table: SloTable | None = None) -> Policy:
    """A policy from its name and settings; kv_aware and pd_pair read `index` (a fresh one if None),
    slo_aware the spec's roofline `table` (without one it is built only to check its settings)."""
    if name not in BUILDERS:
        raise unknown_name("routing policy", name, BUILDERS)
    extra = {"table": table} if name in NEEDS_TABLE and table is not None else {}
    try:
        return BUILDERS[name](index if index is not None else KvIndex(), **dict(settings or {}), **extra)
    except TypeError as exc:  # an unknown or misspelt setting
        raise ValueError(f"bad settings for policy {name!r}: {exc}") from None


def check_spec_settings(spec: ClusterSpec) -> None:
    """Raise SpecError naming ``router.settings`` when the spec's policy rejects its settings."""
    try:
        build_policy(spec.router.policy, spec.router.settings)
    except ValueError as exc:
        raise SpecError("router.settings", str(exc)) from None


class PolicySet:
    """A default policy plus any named per request; policies are built on first use and share
    one KV index and the worker membership."""
    name = "policy_set"

    def __init__(self, default: str, settings: Mapping[str, Settings] | None = None,
                 index: KvIndex | None = None, table: SloTable | None = None, index_fed: bool = True) -> None:
        self.index = index if index is not None else KvIndex()
        self.index_fed = index_fed   # False: nothing feeds the index (no KV events), so it stays empty
        self.table = table   # the spec's roofline table, for slo_aware
        self.default = default
        self._settings = dict(settings or {})
        self._built: dict[str, Policy] = {}
        self._members: set[str] = set()
        self.get(default)  # fail at startup, not on the first request

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicySet:
        try:
            index = KvIndex(**settings.get("kv_index", {}))
        except TypeError as exc:
            raise ValueError(f"bad kv_index settings: {exc}") from None
        return cls(settings.get("policy", "round_robin"), settings.get("policies"), index)

    def get(self, name: str) -> Policy:
        policy = self._built.get(name)
        if policy is None:
            policy = build_policy(name, self._settings.get(name), index=self.index, table=self.table)
            for worker_id in sorted(self._members):
                policy.add_worker(worker_id)
            self._built[name] = policy
        return policy

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        return self.get(request.policy or self.default).choose(request, workers)

    def reads_queues(self, name: str | None) -> bool:
        """Whether policy `name` (None: the default) reads the queue figures slo_ledger.fill gives the
        views (slo_aware alone): the drivers fill them only for a decision that reads them."""
        return getattr(self.get(name or self.default), "reads_queues", False)

    def prompt_blocks(self, name: str | None) -> int | None:
        """Leading prompt blocks policy `name` (None: the default) reads; None: all. A policy not yet
        built counts as reading all (this may run off the event loop, where nothing is built)."""
        policy = self._built.get(name or self.default)
        if policy is None:
            return None
        if not self.index_fed and isinstance(policy, PrefixBounded):
            # Its index match past the ring key finds nothing in an index that stays empty: the same
            # choice from the key's blocks alone.
            return policy.prefix_blocks
        return policy.prompt_blocks

    def add_worker(self, worker_id: str) -> None:
        self._members.add(worker_id)
        for policy in self._built.values():
            policy.add_worker(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        """Take a worker out of every ring and forget its cached blocks."""
        self._members.discard(worker_id)
        for policy in self._built.values():
            policy.remove_worker(worker_id)
        self.index.remove_worker(worker_id)

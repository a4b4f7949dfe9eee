"""Routing policies: pure, synchronous choices of a worker from block hashes and worker snapshots, and the
routing core (choose, lease, P/D plan) the router's proxy and the simulator both call."""
from router.policies.base import Decision, NoWorkerAvailable, Policy, RouteRequest, WorkerView, prefix_key
from router.policies.kv_index import KvIndex
from router.policies.lazy_hashes import LazyBlockHashes
from router.policies.registry import PolicySet, build_policy

__all__ = ["Decision", "KvIndex", "LazyBlockHashes", "NoWorkerAvailable", "Policy", "PolicySet",
           "RouteRequest", "WorkerView", "build_policy", "prefix_key"]

"""The kvlab services a cluster spec implies: the router and one worker per spec slot, with the command each
runs. docker compose (checked by tests/repo/test_compose.py) and the Kubernetes manifests both come from this list,
so a spec change cannot leave one of them behind."""
from __future__ import annotations

from dataclasses import dataclass

from emulator.spec import ClusterSpec

SPEC_MOUNT = "/etc/kvlab/spec.toml"   # where every container finds the spec (compose volume, k8s ConfigMap)


@dataclass(frozen=True)
class Service:
    name: str          # compose service name; the k8s pod name for workers (= the spec's worker id)
    kind: str          # "router" or "worker"
    pool: str          # the spec pool (workers); "" for the router
    role: str          # both / prefill / decode (workers); "" for the router
    port: int          # the spec's port for this service
    command: tuple[str, ...]


def router_service(spec: ClusterSpec, worker_host: str = "{id}") -> Service:
    command = ("kvlab", "router", "--spec", SPEC_MOUNT, "--host", "0.0.0.0", "--worker-host", worker_host)
    return Service("router", "router", "", "", spec.router.port, command)


def worker_services(spec: ClusterSpec) -> list[Service]:
    return [Service(slot.id, "worker", slot.pool, slot.role, slot.port,
                    ("kvlab", "worker", "--spec", SPEC_MOUNT, "--worker-id", slot.id, "--host", "0.0.0.0"))
            for slot in spec.worker_list()]


def services(spec: ClusterSpec) -> list[Service]:
    """Router first, then workers in the spec's pool order."""
    return [router_service(spec), *worker_services(spec)]

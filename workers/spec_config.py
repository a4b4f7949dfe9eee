"""A cluster spec's worker slot as a WorkerConfig: what `kvlab up` starts with `kvlab worker --spec`, and the
engine each simulated worker runs (emulator.sim), so the live and the simulated worker are built alike."""
from __future__ import annotations

import dataclasses
from typing import Any

from emulator.spec import ClusterSpec
from workers.config import WorkerConfig, build_engine
from workers.core.engine import Engine


def spec_fields(spec: ClusterSpec, worker_id: str) -> dict[str, Any]:
    """WorkerConfig fields for the worker `worker_id` of the spec, plus its port."""
    slots = {slot.id: slot for slot in spec.worker_list()}
    if worker_id not in slots:
        raise ValueError(f"no worker {worker_id!r} in spec {spec.name!r}; workers: {', '.join(slots)}")
    slot = slots[worker_id]
    pool = spec.pool(slot.pool)
    return {
        "model": spec.model, "gpu": pool.gpu or spec.gpu, "tp": pool.tp or spec.tp, "tp_link": spec.links.tp,
        "weight_dtype": spec.weight_dtype, "kv_dtype": spec.kv_dtype, "catalog": spec.catalog,
        "worker_id": slot.id, "port": slot.port, "engine": spec.engine_config(pool),
        "time_scale": spec.engine.time_scale, "stream_interval": spec.engine.stream_interval,
        "kv_link": spec.links.kv_transfer, "swap_link": spec.links.host_swap,
    }


def spec_engine(spec: ClusterSpec, worker_id: str, num_blocks: int | None = None) -> Engine:
    """The engine of the spec's worker `worker_id` (`num_blocks` overrides its KV pool), as `kvlab up` builds it."""
    fields = spec_fields(spec, worker_id)
    del fields["port"]
    if num_blocks is not None:
        fields["engine"] = dataclasses.replace(fields["engine"], num_blocks=num_blocks)
    return build_engine(WorkerConfig(**fields), spec.catalog_data())


def prefill_peers(spec: ClusterSpec, host: str, peer_host: str | None = None,
                  peer_port: int | None = None) -> list[str]:
    """Base URLs the spec's prefill workers are reached at. `peer_host` names each one's host ("{id}" is its
    worker id, e.g. "{id}.kvlab-workers" for Kubernetes pods) and `peer_port` replaces the spec's ports;
    by default: on `host` (`kvlab up`, one machine), on loopback when `host` is a wildcard, and under their
    ids (docker compose service names)."""
    hosts = [host, *(("127.0.0.1", "localhost") if host in ("0.0.0.0", "::", "") else ())]
    return [f"http://{h}:{peer_port or slot.port}" for slot in spec.worker_list() if slot.role == "prefill"
            for h in ([peer_host.format(id=slot.id)] if peer_host else [*hosts, slot.id])]

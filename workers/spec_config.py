"""A cluster spec's worker slot as a WorkerConfig (what `kvlab up` starts with `kvlab worker --spec`)."""
from __future__ import annotations

from typing import Any

from emulator.spec import ClusterSpec


def spec_fields(spec: ClusterSpec, worker_id: str) -> dict[str, Any]:
    """WorkerConfig fields for the worker `worker_id` of the spec, plus its port."""
    slots = {slot.id: slot for slot in spec.worker_list()}
    if worker_id not in slots:
        raise ValueError(f"no worker {worker_id!r} in spec {spec.name!r}; workers: {', '.join(slots)}")
    slot = slots[worker_id]
    pool, e = spec.pool(slot.pool), spec.engine
    return {
        "model": spec.model, "gpu": pool.gpu or spec.gpu, "tp": pool.tp or spec.tp, "tp_link": spec.links.tp,
        "weight_dtype": spec.weight_dtype, "kv_dtype": spec.kv_dtype, "catalog": spec.catalog,
        "role": slot.role, "worker_id": slot.id, "port": slot.port,
        "block_size": e.block_size, "max_num_seqs": e.max_num_seqs,
        "max_num_batched_tokens": e.max_num_batched_tokens, "max_waiting": e.max_waiting,
        "max_model_len": e.max_model_len, "gpu_memory_utilization": e.gpu_memory_utilization,
        "activation_reserve_gb": e.activation_reserve_gb, "enable_prefix_caching": e.enable_prefix_caching,
        "eviction": e.eviction, "host_kv_gb": e.host_kv_gb, "preemption": e.preemption, "time_scale": e.time_scale,
        "scheduling_policy": e.scheduling_policy,
        "stream_interval": e.stream_interval,
        "kv_link": spec.links.kv_transfer, "swap_link": spec.links.host_swap,
    }


def prefill_peers(spec: ClusterSpec, host: str, peer_host: str | None = None,
                  peer_port: int | None = None) -> list[str]:
    """Base URLs the spec's prefill workers are reached at. `peer_host` names each one's host ("{id}" is its
    worker id, e.g. "{id}.kvlab-workers" for Kubernetes pods) and `peer_port` replaces the spec's ports;
    by default: on `host` (`kvlab up`, one machine), on loopback when `host` is a wildcard, and under their
    ids (docker compose service names)."""
    hosts = [host, *(("127.0.0.1", "localhost") if host in ("0.0.0.0", "::", "") else ())]
    return [f"http://{h}:{peer_port or slot.port}" for slot in spec.worker_list() if slot.role == "prefill"
            for h in ([peer_host.format(id=slot.id)] if peer_host else [*hosts, slot.id])]

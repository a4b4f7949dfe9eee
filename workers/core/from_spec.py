"""Build a worker's engine from a cluster spec: the one translation every driver shares."""
from __future__ import annotations

from emulator.spec import ClusterSpec, PoolSpec
from workers.core.engine import Engine, EngineConfig
from workers.core.scheduler import SchedulerConfig


def engine_config(spec: ClusterSpec, pool: PoolSpec, num_blocks: int | None = None) -> EngineConfig:
    e = spec.engine
    return EngineConfig(
        role=pool.role, block_size=e.block_size, gpu_memory_utilization=e.gpu_memory_utilization,
        activation_reserve_gb=e.activation_reserve_gb, num_blocks=num_blocks, eviction=e.eviction,
        max_model_len=e.max_model_len, enable_prefix_caching=e.enable_prefix_caching, host_kv_gb=e.host_kv_gb,
        scheduler=SchedulerConfig(max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs,
                                  max_waiting=e.max_waiting, preemption=e.preemption, policy=e.scheduling_policy))


def build_engine(spec: ClusterSpec, pool: PoolSpec | str, num_blocks: int | None = None) -> Engine:
    pool = spec.pool(pool) if isinstance(pool, str) else pool
    return Engine(spec.deployment(pool), engine_config(spec, pool, num_blocks),
                  kv_link=spec.kv_transfer_link() if pool.role == "decode" else None,
                  swap_link=spec.host_swap_link())

"""The engine's settings: one frozen object that the live worker, the simulator and the planner all take.

vLLM's defaults are written here once; the spec's ``[engine]`` table, the worker's flags and the
planner's inputs take theirs from ``DEFAULTS``. ``ClusterSpec.engine_config(pool)`` (emulator.spec) is the
one translation from a spec to this object. Plain data: every floor from the spec up may use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeGuard, get_args

from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE

Role = Literal["both", "prefill", "decode"]   # a worker's part: whole requests, or one side of P/D
ROLES: tuple[Role, ...] = get_args(Role)
Preemption = Literal["recompute", "swap"]
Eviction = Literal["lru", "lfu"]
SchedulingPolicy = Literal["fcfs", "priority"]


def is_role(value: str) -> TypeGuard[Role]:
    return value in ROLES


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineConfig:
    """One worker's engine. Defaults are vLLM's (docs.vllm.ai, "Engine Arguments") unless the comment says."""
    role: Role = "both"
    block_size: int = DEFAULT_BLOCK_SIZE   # vLLM --block-size: tokens per KV block (the hashes' floor holds it)
    max_num_batched_tokens: int = 8192     # vLLM V1's per-step token budget for its OpenAI server on >=70 GB GPUs
    max_num_seqs: int = 256                # vLLM --max-num-seqs: the running-batch cap
    gpu_memory_utilization: float = 0.9    # vLLM --gpu-memory-utilization: the share of HBM it budgets
    activation_reserve_gb: float = 2.0     # peak activations found by vLLM's profiling run; an estimate (roofline)
    max_model_len: int | None = None       # None: the model's max_context, as vLLM does
    max_waiting: int = 1024                # kvlab's bounded queue: beyond ~4 batches of waiting work, reject
    preemption: Preemption = "recompute"   # vLLM V1 preempts by recompute
    swap_space_gb: float = 4.0             # vLLM --swap-space: GiB of host memory per GPU; carried, not yet a
                                           # bound: swapped-out KV is timed over the host link, never refused
    eviction: Eviction = "lru"             # vLLM's prefix cache evicts least recently used free blocks
    host_kv_gb: float = 0.0                # host memory per worker for KV evicted from HBM (0: no host tier),
                                           # reached over the host link, as vLLM's CPU offloading connector
    enable_prefix_caching: bool = True     # on by default in vLLM V1
    scheduling_policy: SchedulingPolicy = "fcfs"  # vLLM --scheduling-policy: fcfs, or priority (lower value first)
    num_blocks: int | None = None          # vLLM --num-gpu-blocks-override; None: sized from HBM (roofline)
    eos_probability: float = 0.0           # kvlab: worker-wide EOS chance per token (0: exactly max_tokens)
    hold_timeout_s: float = 60.0           # kvlab, prefill role: KV nobody pulled is freed after this long


DEFAULTS = EngineConfig()

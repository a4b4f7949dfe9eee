"""One worker's configuration (plain data) and the engine it describes.

The CLI, the launcher and the tests fill a ``WorkerConfig``; ``build_engine`` turns it into an engine
on a roofline ``Deployment`` looked up in the catalog. Nothing here does I/O beyond reading an
optional user catalog file.
"""
from __future__ import annotations

import msgspec

from emulator.physics import roofline
from emulator.physics.catalog import Catalog, Link, load_catalog
from workers.core.engine import ROLES, Engine, EngineConfig
from workers.core.scheduler import SchedulerConfig

DEFAULT_KV_LINK = "InfiniBand-NDR"   # the RDMA fabric of DistServe/Mooncake-style P/D deployments
DEFAULT_SWAP_LINK = "PCIe-Gen5"      # host memory of a Hopper/Blackwell node sits behind PCIe Gen5 x16
MiB = 1 << 20
MAX_STREAM_INTERVAL = 256             # as a spec's engine.stream_interval


class WorkerConfig(msgspec.Struct, kw_only=True):
    # what is served, on what
    model: str = "Llama-3.1-8B"
    gpu: str = "H100-SXM"
    tp: int = 1
    tp_link: str | None = None            # None: the GPU's intra-node link (NVLink on HGX boards)
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    catalog: str | None = None            # user catalog file adding or overriding entries
    # identity and API surface
    role: str = "both"
    worker_id: str = "worker-0"
    served_model_name: str | None = None  # None: the catalog model name
    model_aliases: list[str] = []         # other names accepted in the request's `model`
    tokenizer: str | None = None          # a tokenizer.json; None: kvlab's built-in tokenizer
    advertise_url: str | None = None      # base URL put in kv_transfer_params; None: from the Host header
    max_body_bytes: int = 8 * MiB
    completion_max_tokens: int = 16       # OpenAI's documented default for /v1/completions
    chat_max_tokens: int = 256            # chat has no OpenAI default; keep emulated answers short
    # engine
    time_scale: float = 1.0
    stream_interval: int = 1              # tokens per SSE chunk after the first (requests may ask for their own)
    num_blocks: int | None = None         # None: sized from HBM minus weights (roofline)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_waiting: int = 1024
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9   # vLLM's default share of HBM (sizes the pool without num_blocks)
    activation_reserve_gb: float = 2.0    # see roofline.kv_pool_bytes_per_gpu
    enable_prefix_caching: bool = True    # vLLM V1 default
    eos_probability: float = 0.0
    eviction: str = "lru"
    preemption: str = "recompute"
    scheduling_policy: str = "fcfs"       # vLLM's --scheduling-policy: "fcfs" or "priority" (lower value first)
    host_kv_gb: float = 0.0               # host memory for KV evicted from HBM (0: no host tier)
    swap_link: str | None = None          # None: PCIe Gen5 when preemption is "swap" or a host tier is on
    hold_timeout_s: float = 60.0          # prefill role: KV nobody pulled is freed after this long
    # P/D handoff and KV events
    kv_link: str | None = None            # decode role: None means InfiniBand NDR
    release_timeout_s: float = 5.0        # decode role: POST /v1/kv/release to the prefill worker
    peers: list[str] = []                 # decode/both role: base URLs of the prefill workers it may pull KV
                                          # from (and tell to release it); any other remote_url is refused,
                                          # so a request can never make this worker call a URL of its choosing
    kv_events_endpoint: str | None = None         # ZMQ PUB address the worker binds, e.g. tcp://127.0.0.1:5557
    kv_events_replay_endpoint: str | None = None  # optional ZMQ ROUTER address for replay requests
    kv_events_topic: str = ""
    kv_events_buffer: int = 4096          # batches kept for replay (ZMQ and HTTP)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def accepted_models(self) -> frozenset[str]:
        return frozenset([self.model_name, self.model, *self.model_aliases])


def validate(cfg: WorkerConfig) -> None:
    if cfg.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} (got {cfg.role!r})")
    if cfg.time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    if not 1 <= cfg.stream_interval <= MAX_STREAM_INTERVAL:
        raise ValueError(f"stream_interval must be in 1..{MAX_STREAM_INTERVAL}")
    if cfg.scheduling_policy not in ("fcfs", "priority"):
        raise ValueError(f"scheduling_policy must be fcfs or priority, got {cfg.scheduling_policy!r}")
    if cfg.host_kv_gb < 0:
        raise ValueError("host_kv_gb must be >= 0")
    if cfg.max_body_bytes < 1024:
        raise ValueError("max_body_bytes must be at least 1024")


def deployment(cfg: WorkerConfig, catalog: Catalog) -> roofline.Deployment:
    gpu = catalog.gpu(cfg.gpu)
    tp_link = catalog.link(cfg.tp_link or gpu.intra_node_link) if cfg.tp > 1 else None
    return roofline.Deployment(model=catalog.model(cfg.model), gpu=gpu, tp=cfg.tp, tp_link=tp_link,
                               weight_dtype=cfg.weight_dtype, kv_dtype=cfg.kv_dtype)


def kv_link(cfg: WorkerConfig, catalog: Catalog) -> Link | None:
    if cfg.kv_link is not None:
        return catalog.link(cfg.kv_link)
    return catalog.link(DEFAULT_KV_LINK) if cfg.role == "decode" else None


def engine_config(cfg: WorkerConfig) -> EngineConfig:
    sched = SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                            max_waiting=cfg.max_waiting, preemption=cfg.preemption, policy=cfg.scheduling_policy)
    return EngineConfig(role=cfg.role, block_size=cfg.block_size, num_blocks=cfg.num_blocks,
                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                        activation_reserve_gb=cfg.activation_reserve_gb, eviction=cfg.eviction,
                        enable_prefix_caching=cfg.enable_prefix_caching, max_model_len=cfg.max_model_len,
                        eos_probability=cfg.eos_probability, hold_timeout_s=cfg.hold_timeout_s,
                        host_kv_gb=cfg.host_kv_gb,
                        scheduler=sched)


def build_engine(cfg: WorkerConfig, catalog: Catalog | None = None) -> Engine:
    validate(cfg)
    catalog = catalog or load_catalog(cfg.catalog)
    host_link = cfg.preemption == "swap" or cfg.host_kv_gb > 0
    swap = catalog.link(cfg.swap_link or DEFAULT_SWAP_LINK) if host_link else None
    return Engine(deployment(cfg, catalog), engine_config(cfg), kv_link=kv_link(cfg, catalog), swap_link=swap)

"""One worker's configuration (plain data) and the engine it describes.

The CLI, the launcher and the tests fill a ``WorkerConfig``: what is served and how it answers, and the
engine's settings as one ``EngineConfig`` (from a spec: ``workers.spec_config``). ``build_engine`` turns
it into an engine on a roofline ``Deployment`` looked up in the catalog. Nothing here does I/O beyond
reading an optional user catalog file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, get_args

import msgspec

from emulator.engine_config import ROLES, EngineConfig, SchedulingPolicy
from emulator.physics import roofline
from emulator.physics.catalog import Catalog, Link, load_catalog
from emulator.physics.deployment import deployment as catalog_deployment
from emulator.spec import DEFAULT_HOST_SWAP_LINK, DEFAULT_KV_TRANSFER_LINK, MAX_STREAM_INTERVAL
from workers.core.engine import Engine

MiB = 1 << 20
ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


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
    worker_id: str = "worker-0"
    served_model_name: str | None = None  # None: the catalog model name
    model_aliases: list[str] = []         # other names accepted in the request's `model`
    tokenizer: str | None = None          # a tokenizer.json; None: kvlab's built-in tokenizer
    advertise_url: str | None = None      # base URL put in kv_transfer_params; None: from the Host header
    max_body_bytes: int = 8 * MiB
    completion_max_tokens: int = 16       # OpenAI's documented default for /v1/completions
    chat_max_tokens: int = 256            # chat has no OpenAI default; keep emulated answers short
    # the engine, and the driver that runs it on the wall clock
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    time_scale: float = 1.0
    stream_interval: int = 1              # tokens per SSE chunk after the first (requests may ask for their own)
    swap_link: str | None = None          # None: PCIe Gen5 when preemption is "swap" or a host tier is on
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
    def role(self) -> str:
        return self.engine.role

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def accepted_models(self) -> frozenset[str]:
        return frozenset([self.model_name, self.model, *self.model_aliases])


def worker_config(engine: EngineConfig | None = None, **fields: Any) -> WorkerConfig:
    """A WorkerConfig from flat settings (flags, fixtures): engine settings among them (``role``,
    ``num_blocks``, ...) replace those of `engine`, the rest are WorkerConfig fields."""
    changes = {name: fields.pop(name) for name in list(fields) if name in ENGINE_FIELDS}
    return WorkerConfig(engine=dataclasses.replace(engine or EngineConfig(), **changes), **fields)


def validate(cfg: WorkerConfig) -> None:
    if cfg.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} (got {cfg.role!r})")
    if cfg.time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    if not 1 <= cfg.stream_interval <= MAX_STREAM_INTERVAL:
        raise ValueError(f"stream_interval must be in 1..{MAX_STREAM_INTERVAL}")
    if cfg.engine.host_kv_gb < 0:
        raise ValueError("host_kv_gb must be >= 0")
    if cfg.engine.scheduling_policy not in get_args(SchedulingPolicy):
        raise ValueError(f"scheduling_policy must be fcfs or priority, got {cfg.engine.scheduling_policy!r}")
    if cfg.max_body_bytes < 1024:
        raise ValueError("max_body_bytes must be at least 1024")


def deployment(cfg: WorkerConfig, catalog: Catalog) -> roofline.Deployment:
    return catalog_deployment(catalog, cfg.model, cfg.gpu, cfg.tp, cfg.tp_link, cfg.weight_dtype, cfg.kv_dtype)


def kv_link(cfg: WorkerConfig, catalog: Catalog) -> Link | None:
    if cfg.kv_link is not None:
        return catalog.link(cfg.kv_link)
    return catalog.link(DEFAULT_KV_TRANSFER_LINK) if cfg.role == "decode" else None


def swap_link(cfg: WorkerConfig, catalog: Catalog) -> Link | None:
    """Host memory's link: swap preemption and the host KV tier cross it, nothing else reads it."""
    host = cfg.engine.preemption == "swap" or cfg.engine.host_kv_gb > 0
    return catalog.link(cfg.swap_link or DEFAULT_HOST_SWAP_LINK) if host else None


def build_engine(cfg: WorkerConfig, catalog: Catalog | None = None) -> Engine:
    validate(cfg)
    catalog = catalog or load_catalog(cfg.catalog)
    return Engine(deployment(cfg, catalog), cfg.engine, kv_link=kv_link(cfg, catalog),
                  swap_link=swap_link(cfg, catalog))

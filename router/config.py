"""The router's configuration: plain msgspec data, built from CLI flags, a cluster spec, or code.

Nothing here does I/O except ``from_spec`` (which reads the spec through emulator.spec). The HTTP
server, worker pool and proxy receive a RouterConfig; none of them reads globals or the environment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from emulator.engine_config import Role
from emulator.spec import load_spec
from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE
from kvlab.wire.http_server import ServerLimits
from router.frontdoor.tenants import TenantConfig
from router.policies.hash_memo import DEFAULT_RUNS
from router.policies.registry import check_spec_settings, host_credit
from router.policies.slo_table import SloTable
from router.policies.slo_table import from_spec as slo_table


class WorkerConfig(msgspec.Struct, kw_only=True):
    url: str                        # base URL, e.g. http://127.0.0.1:8100 (no trailing /v1)
    id: str = ""                    # defaults to host:port
    role: Role = "both"
    kv_events: str | None = None    # ZMQ endpoint of its KV events (tcp://host:port); None: poll HTTP

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if not self.id:
            self.id = self.url.split("://", 1)[-1]


class Timeouts(msgspec.Struct, kw_only=True):
    """Every upstream call has a bound, so no client request can hang on a stuck worker."""
    connect_s: float = 2.0          # TCP connect to a worker (loopback/LAN: a dead host fails in ms)
    first_byte_s: float = 60.0      # request sent -> response headers (covers queueing and prefill)
    idle_s: float = 30.0            # between two chunks of a stream (a stalled decode is a dead worker)
    total_s: float = 600.0          # whole non-streaming call
    health_s: float = 1.0           # one /health or /load probe


class Limits(msgspec.Struct, kw_only=True):
    max_body_bytes: int = 8 << 20           # 8 MiB: a 128K-token prompt as JSON ids is ~1 MB
    max_input_tokens: int | None = None     # None: no router-side limit (the worker still checks)
    max_tokens_limit: int | None = None     # cap on a request's max_tokens
    default_max_tokens: int = 16            # OpenAI's legacy completions default (as the workers)
    chat_default_max_tokens: int = 256      # the emulated workers' chat default; match your workers
    max_attempts: int = 3                   # upstream tries per request (first + retries/migrations)
    max_model_len: int | None = None        # the model's context; None: learned from the workers' /v1/models
    offload_bytes: int = 16 << 10           # bodies this large are decoded and tokenized on a thread, off the
                                            # event loop (~3 MB/s of text: 16 KiB would stall it ~5 ms)
    body_timeout_s: float = 30.0            # whole request body must arrive within this (slow senders)


class HealthConfig(msgspec.Struct, kw_only=True):
    interval_s: float = 1.0         # /load poll period; also how fast a recovered worker comes back
    failures_to_remove: int = 2     # consecutive failed probes before a worker leaves routing


class SheddingConfig(msgspec.Struct, kw_only=True):
    enabled: bool = False
    ttft_slo_s: float = 1.0         # the TTFT target that the queue-depth threshold derives from
    # One prefill-capable worker on the expected workload (wall seconds; from the roofline when built
    # from a spec): a request's mean prefill time alone (S), and the mean worker time per request
    # when a backlog packs steps full (1/mu: the drain rate a queue empties at). None: unknown, and
    # the drain rate is measured from finished requests instead.
    prefill_s: float | None = None
    drain_s: float | None = None
    places: int | None = None       # a worker's line sized for the p99 TTFT (drain.p99_places); None: the
                                    # mean rule floor((SLO - S) / drain_s)


class RouterConfig(msgspec.Struct, kw_only=True):
    workers: list[WorkerConfig] = []
    policy: str = "prefix_bounded"              # the default
    policy_header: bool = False                 # any client may pick the policy (x-kvlab-policy), for
                                                # experiments; else only tenants with choose_policy
    policies: dict[str, dict[str, Any]] = {}    # settings by policy name, e.g. {"prefix_bounded": {"eps": 0.25}}
    kv_index: dict[str, Any] = {}               # KvIndex settings (rehash, media); block_size defaults to ours
    tenants: list[TenantConfig] = []
    limits: Limits = msgspec.field(default_factory=Limits)
    server: ServerLimits = msgspec.field(default_factory=ServerLimits)   # header deadline, connection cap
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    shedding: SheddingConfig = msgspec.field(default_factory=SheddingConfig)
    admin_token: str | None = None          # None: the admin API answers 403
    metrics_token: str | None = None        # set: /metrics and /cluster need it as a Bearer token
    salt_secret: str | None = None          # derives salted tenants' cache salts; None: random per process, so
                                            # salted tenants' cache is lost on restart and not shared between
                                            # routers. Give it from a file or $KVLAB_SALT_SECRET (read_secret)
    tokenizer: str | None = None            # a tokenizer.json; None: kvlab's built-in tokenizer
    block_size: int = DEFAULT_BLOCK_SIZE    # must equal the workers' KV block size
    hash_memo_runs: int = DEFAULT_RUNS      # 64-block hash runs remembered (router.policies.hash_memo); 0: off
    kv_events: Literal["zmq", "http", "off"] = "http"
    kv_events_poll_s: float = 0.1           # HTTP polling period of /v1/kv_events (index lag <= this)
    models: list[str] = []                  # served model names; empty: learned from workers' /v1/models
    slo_table: SloTable | None = None       # the spec's roofline figures for slo_aware (None: not from a spec)


SALT_SECRET_ENV = "KVLAB_SALT_SECRET"


def read_secret(path: str | Path) -> str:
    """A secret from a file (surrounding whitespace dropped); never echoed in errors or logs."""
    secret = Path(path).read_text().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def from_spec(path: str, worker_host: str = "127.0.0.1",
              worker_port: int | None = None) -> tuple[RouterConfig, int, str]:
    """(config, port, listen host) from a cluster spec: its workers, router section, tenants and SLO.
    `worker_port`, when given, replaces every worker's spec port (Kubernetes pods each have an address)."""
    spec = load_spec(path)
    check_spec_settings(spec)
    # worker_host may name each worker's own host: "{id}" is the worker id (compose service names)
    workers = [WorkerConfig(url=f"http://{worker_host.format(id=slot.id)}:{worker_port or slot.port}", id=slot.id,
                            role=slot.role)
               for slot in spec.worker_list()]
    r = spec.router
    limits = Limits(max_input_tokens=r.max_input_tokens, max_tokens_limit=r.max_tokens_limit,
                    max_model_len=spec.max_model_len)
    tenants = tenant_configs(spec)
    salt_secret = read_secret(r.salt_secret_file) if r.salt_secret_file else None
    config = RouterConfig(workers=workers, policy=r.policy, policies={r.policy: dict(r.settings)}, tenants=tenants,
                          limits=limits, admin_token=r.admin_token, salt_secret=salt_secret,
                          block_size=spec.engine.block_size, kv_index=_index_settings(spec),
                          shedding=shedding_config(spec), models=[spec.model], slo_table=slo_table(spec))
    return config, r.port, r.host


def tenant_configs(spec) -> list[TenantConfig]:
    """The spec's tenants as the router's front door (and the simulator, which admits as it) holds them."""
    return [TenantConfig(name=t.name, api_keys=list(t.api_keys), requests_per_s=t.requests_per_s,
                         tokens_per_s=t.tokens_per_s, max_concurrency=t.max_concurrency,
                         cache_salt=t.cache_salt, priority=t.priority) for t in spec.tenants]


def _index_settings(spec) -> dict[str, Any]:
    """With a host KV tier, the index follows host-held blocks and credits them (router.policies.kv_index)."""
    credit = host_credit(spec)
    return {} if credit is None else {"host_credit": credit}


def shedding_config(spec, time_scale: float | None = None) -> SheddingConfig:
    """The spec's load shedder (router.frontdoor.gate.DrainLimit). Its SLO and drain times are in
    emulated seconds x `time_scale`: the spec's for the router, which measures wall seconds (time_scale
    times longer), and 1 for the simulator's clock, which is emulated time."""
    from router.frontdoor.drain import prefill_times
    scale = spec.engine.time_scale if time_scale is None else time_scale
    slo_s = spec.slo.ttft_p99_s * scale
    if not spec.router.shedding:
        return SheddingConfig(enabled=False, ttft_slo_s=slo_s)
    drain = prefill_times(spec)   # S, 1/mu and the line (router.frontdoor.drain)
    return SheddingConfig(enabled=True, ttft_slo_s=slo_s, prefill_s=drain.prefill_s * scale,
                          drain_s=drain.drain_s * scale, places=drain.places)

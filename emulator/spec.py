"""The declarative cluster spec: one file drives the launcher, docker compose, the simulator and the planner.

A spec names the model, GPU and TP degree, the worker pools and their roles, the links between them,
the router policy, tenants, SLOs and workload defaults. It is decoded with msgspec from TOML (or YAML
when PyYAML is installed) and validated in full before anything starts, so that a bad field fails
with one message naming the field and why: ``spec error at pools[1].count: must be >= 1 (got -2)``.

Everything here is plain data; the only I/O is reading the spec (and an optional catalog) file.
"""
from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import msgspec

from emulator.engine_config import DEFAULTS, ROLES, EngineConfig, Eviction, Preemption, Role, SchedulingPolicy
from emulator.physics import roofline
from emulator.physics.catalog import DTYPE_BYTES, Catalog, CatalogError, Link, load_catalog
from emulator.physics.deployment import deployment
from kvlab.wire.user_errors import UserError, did_you_mean

# The router's policy names. router/policies/registry.py builds them and checks their settings
# (`check_spec_settings`); a test keeps the two lists equal.
POLICIES = ("round_robin", "least_loaded", "prefix_ring", "prefix_bounded", "kv_aware", "pd_pair", "slo_aware")
MAX_TP = 8                        # one HGX/DGX node's NVLink domain; TP across nodes is not modelled
DEFAULT_ROUTER_PORT = 8000        # the port OpenAI-compatible servers (vLLM included) listen on by default
DEFAULT_WORKER_BASE_PORT = 8100   # workers count up from here unless a pool sets base_port
MAX_STREAM_INTERVAL = 256         # tokens per SSE chunk: beyond this a chunk delays text by whole seconds
DEFAULT_KV_TRANSFER_LINK = "InfiniBand-NDR"  # the RDMA fabric of DistServe/Mooncake-style P/D deployments
DEFAULT_HOST_SWAP_LINK = "PCIe-Gen5"         # host memory of a Hopper/Blackwell node sits behind PCIe Gen5 x16
# Pool names become worker ids, compose service names and metric labels: keep them to that safe alphabet.
_POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class SpecError(UserError):
    """A spec field that cannot be used: ``field`` is a path like ``pools[1].count``."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"spec error at {field}: {reason}")


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Unknown fields are errors: a typo must not silently fall back to a default."""


class EngineSpec(_Section):
    """The ``[engine]`` table: EngineConfig's settings (defaults and their sources there) plus the driver's."""
    block_size: int = DEFAULTS.block_size
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    max_num_seqs: int = DEFAULTS.max_num_seqs
    gpu_memory_utilization: float = DEFAULTS.gpu_memory_utilization
    activation_reserve_gb: float = DEFAULTS.activation_reserve_gb
    max_model_len: int | None = DEFAULTS.max_model_len
    max_waiting: int = DEFAULTS.max_waiting
    preemption: Preemption = DEFAULTS.preemption
    scheduling_policy: SchedulingPolicy = DEFAULTS.scheduling_policy   # "priority": tenants' priority
                                                                       # classes order the queue (README: Routing)
    swap_space_gb: float = DEFAULTS.swap_space_gb
    eviction: Eviction = DEFAULTS.eviction
    host_kv_gb: float = DEFAULTS.host_kv_gb
    enable_prefix_caching: bool = DEFAULTS.enable_prefix_caching
    time_scale: float = 1.0                # >1 stretches emulated time: every duration x time_scale on the wall clock
    lag_warn_s: float = 0.05               # a worker this far behind its schedule (wall s) is flagged as lagging
    stream_interval: int = 1               # tokens per SSE chunk after the first (SGLang's --stream-interval); each
                                           # chunk carries its tokens' own emulated gaps, so ITL stays per token


class PoolSpec(_Section):
    name: str = ""                         # defaults to the role; worker ids are "<name>-<index>"
    role: Role = "both"
    count: int = 1
    gpu: str | None = None                 # overrides the spec's gpu for this pool
    tp: int | None = None                  # overrides the spec's tp for this pool
    base_port: int | None = None           # None: the next free ports after the previous pool's


class LinksSpec(_Section):
    tp: str | None = None                  # None: each pool's GPU's intra_node_link (NVLink on HGX boards)
    kv_transfer: str = DEFAULT_KV_TRANSFER_LINK   # prefill -> decode KV handoff
    host_swap: str = DEFAULT_HOST_SWAP_LINK       # GPU <-> host memory for swap preemption


class RouterSpec(_Section):
    policy: str = "prefix_bounded"
    settings: dict[str, Any] = {}          # the policy's keyword arguments, e.g. prefix_blocks, eps (router docs)
    host: str = "127.0.0.1"
    port: int = DEFAULT_ROUTER_PORT
    admin_token: str | None = None         # None: the admin API is disabled
    salt_secret_file: str | None = None    # file holding the secret salted tenants' cache salts derive from
                                           # (relative to the spec); None: $KVLAB_SALT_SECRET, else random
    max_input_tokens: int | None = None    # None: no router-side cap (workers still refuse > max_model_len)
    max_tokens_limit: int | None = None    # None: no router-side cap on max_tokens
    shedding: bool = True                  # Little's-law load shedding against the TTFT SLO
    processes: int | None = None           # router processes under `kvlab up`; None: the cores
                                           # left once each of this host's workers has one


class TenantSpec(_Section):
    name: str
    api_keys: list[str] = []
    requests_per_s: float | None = None    # None: unlimited
    tokens_per_s: float | None = None
    max_concurrency: int | None = None
    cache_salt: bool = False               # salt this tenant's block hashes so no KV block is shared
    priority: Literal["interactive", "batch"] = "interactive"   # with engine.scheduling_policy = "priority",
                                           # interactive requests are scheduled before batch ones


class SloSpec(_Section):
    ttft_p99_s: float = 1.0                # chat-style targets, in emulated (unscaled) seconds
    itl_p99_s: float = 0.1
    e2e_p99_s: float | None = None


class WorkloadSpec(_Section):
    """Defaults for sweeps and simulations; emulator.workload turns these into requests."""
    mix: dict[str, float] = msgspec.field(default_factory=lambda: {"chat": 1.0})  # archetype -> weight
    params: dict[str, dict[str, Any]] = {}  # archetype -> overrides of its parameters
    tenants: dict[str, float] = {}         # tenant -> weight; empty: every request is the first tenant's
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0                        # coefficient of variation of gaps (gamma); 1 is Poisson
    seed: int = 0
    rates: list[float] = []                # requests/s to sweep; empty: the sweep picks them from the planner
    duration_s: float = 60.0
    warmup_s: float = 10.0
    num_requests: int | None = None
    trace: str | None = None               # a trace file to replay instead (relative to the spec's folder)


class WorkerSlot(NamedTuple):
    id: str
    pool: str
    role: Role
    port: int


class ClusterSpec(_Section):
    model: str
    gpu: str
    tp: int = 1
    name: str = "kvlab"
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    catalog: str | None = None             # a user catalog file (relative to the spec's folder)
    engine: EngineSpec = msgspec.field(default_factory=EngineSpec)
    pools: list[PoolSpec] = []
    links: LinksSpec = msgspec.field(default_factory=LinksSpec)
    router: RouterSpec = msgspec.field(default_factory=RouterSpec)
    tenants: list[TenantSpec] = []
    slo: SloSpec = msgspec.field(default_factory=SloSpec)
    workload: WorkloadSpec = msgspec.field(default_factory=WorkloadSpec)

    # -- resolved views ------------------------------------------------------------------------

    def catalog_data(self) -> Catalog:
        return _catalog(self.catalog)

    @property
    def disaggregated(self) -> bool:
        return any(p.role != "both" for p in self.pools)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len or self.catalog_data().model(self.model).max_context

    def pool(self, name: str) -> PoolSpec:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool {name!r}; pools: {', '.join(p.name for p in self.pools)}")

    def pools_with_role(self, role: str) -> list[PoolSpec]:
        return [p for p in self.pools if p.role == role]

    def deployment(self, pool: PoolSpec | str) -> roofline.Deployment:
        """What one worker of `pool` runs: model, GPU, TP group and dtypes."""
        pool = self.pool(pool) if isinstance(pool, str) else pool
        return deployment(self.catalog_data(), self.model, pool.gpu or self.gpu, pool.tp or self.tp, self.links.tp,
                          self.weight_dtype, self.kv_dtype)

    def engine_config(self, pool: PoolSpec | str | None = None) -> EngineConfig:
        """The engine of one worker of `pool` (None: the settings every pool shares, role "both"): the one
        translation of ``[engine]`` the live worker, the simulator and the planner all take."""
        pool = self.pool(pool) if isinstance(pool, str) else pool
        e = self.engine
        return EngineConfig(
            role=pool.role if pool else "both", block_size=e.block_size,
            max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs,
            gpu_memory_utilization=e.gpu_memory_utilization, activation_reserve_gb=e.activation_reserve_gb,
            max_model_len=e.max_model_len, max_waiting=e.max_waiting, preemption=e.preemption,
            scheduling_policy=e.scheduling_policy, swap_space_gb=e.swap_space_gb, eviction=e.eviction,
            host_kv_gb=e.host_kv_gb, enable_prefix_caching=e.enable_prefix_caching)

    def kv_capacity_tokens(self, pool: PoolSpec | str) -> int:
        return roofline.kv_capacity_tokens(self.deployment(pool), self.engine.gpu_memory_utilization,
                                           self.engine.activation_reserve_gb)

    def kv_blocks(self, pool: PoolSpec | str) -> int:
        """KV blocks per worker of `pool` (every GPU of a TP group holds its shard of each block)."""
        return self.kv_capacity_tokens(pool) // self.engine.block_size

    def kv_transfer_link(self) -> Link:
        return self.catalog_data().link(self.links.kv_transfer)

    def host_swap_link(self) -> Link:
        return self.catalog_data().link(self.links.host_swap)

    def worker_list(self) -> list[WorkerSlot]:
        """Every worker in pool order: deterministic ids ``<pool>-<i>`` and ports."""
        slots, next_port = [], DEFAULT_WORKER_BASE_PORT
        for p in self.pools:
            start = p.base_port if p.base_port is not None else next_port
            slots += [WorkerSlot(f"{p.name}-{i}", p.name, p.role, start + i) for i in range(p.count)]
            next_port = max(next_port, start + p.count)
        return slots

    def tenant_for_key(self, api_key: str) -> TenantSpec | None:
        return next((t for t in self.tenants if api_key in t.api_keys), None)


@functools.lru_cache(maxsize=16)
def _catalog(path: str | None) -> Catalog:
    return load_catalog(path)


# -- loading -------------------------------------------------------------------------------------

def parse_spec(text: str | bytes, fmt: str = "toml", base_dir: str | Path | None = None) -> ClusterSpec:
    """Decode and validate a spec; a relative ``catalog`` path resolves against `base_dir`."""
    spec = _decode(text, fmt)
    spec = _resolve_names(spec, base_dir)
    validate(spec)
    return spec


def load_spec(path: str | Path) -> ClusterSpec:
    """Load a spec file (.toml, .yaml, .yml) or a packaged example by bare name (``default``)."""
    path = resolve_spec_path(path)
    fmt = "yaml" if path.suffix in (".yaml", ".yml") else "toml"
    return parse_spec(path.read_bytes(), fmt, base_dir=path.parent)


def resolve_spec_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists() or p.suffix or len(p.parts) > 1:
        if not p.exists():
            raise SpecError(str(path), f"spec file not found; pass a spec file or an example name "
                                       f"({', '.join(example_specs())})")
        return p
    if p.name not in example_specs():
        raise SpecError(str(path), f"no such file or example spec{did_you_mean(p.name, example_specs())}; "
                                   f"examples: {', '.join(example_specs())}")
    return example_spec_path(p.name)


def example_specs() -> list[str]:
    """Names of the specs shipped in kvlab/specs."""
    folder = resources.files("kvlab") / "specs"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".toml"))


def example_spec_path(name: str) -> Path:
    return Path(str(resources.files("kvlab") / "specs" / f"{name}.toml"))


def _decode(text: str | bytes, fmt: str) -> ClusterSpec:
    try:
        if fmt == "toml":
            return msgspec.toml.decode(text, type=ClusterSpec)
        if fmt in ("yaml", "yml"):
            return _decode_yaml(text)
    except msgspec.ValidationError as exc:
        raise _from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise SpecError("<file>", f"not valid {fmt.upper()}: {exc}") from None
    raise SpecError("<file>", f"unknown spec format {fmt!r}; use toml or yaml")


def _decode_yaml(text: str | bytes) -> ClusterSpec:
    try:
        import yaml  # noqa: F401  (optional: msgspec.yaml needs PyYAML)
    except ImportError:
        raise SpecError("<file>", "YAML specs need PyYAML (pip install pyyaml); or use TOML") from None
    return msgspec.yaml.decode(text, type=ClusterSpec)


def _from_validation(exc: msgspec.ValidationError) -> SpecError:
    """msgspec says 'Expected `int`, got `str` - at `$.pools[0].count`'; name the field first."""
    message = str(exc)
    reason, _, where = message.partition(" - at `$")
    field = where.rstrip("`").lstrip(".")
    if reason.startswith("Object contains unknown field `"):
        name = reason.split("`")[1]
        field = f"{field}.{name}" if field else name
        return SpecError(field, "unknown field (a typo?)")
    if reason.startswith("Object missing required field `"):
        name = reason.split("`")[1]
        field = f"{field}.{name}" if field else name
        return SpecError(field, "required field missing")
    reason = reason[:1].lower() + reason[1:]
    choices = _CHOICES.get(field.rpartition(".")[2])
    if reason.startswith("invalid enum value") and choices:
        reason += f"; known: {', '.join(choices)}"
    return SpecError(field or "<spec>", reason)


# Fields typed as Literal, for listing their choices in an error (msgspec names only the bad value).
_CHOICES = {"role": ROLES, "preemption": get_args(Preemption), "eviction": get_args(Eviction),
            "arrival": ("poisson", "gamma")}


def _resolve_names(spec: ClusterSpec, base_dir: str | Path | None) -> ClusterSpec:
    """Give unnamed pools their role as name; make relative catalog, trace and secret paths absolute."""
    pools = [msgspec.structs.replace(p, name=p.name or p.role) for p in spec.pools]
    workload = msgspec.structs.replace(spec.workload, trace=_beside(spec.workload.trace, base_dir))
    router = msgspec.structs.replace(spec.router, salt_secret_file=_beside(spec.router.salt_secret_file, base_dir))
    return msgspec.structs.replace(spec, pools=pools, catalog=_beside(spec.catalog, base_dir), workload=workload,
                                   router=router)


def _beside(path: str | None, base_dir: str | Path | None) -> str | None:
    if path is None or base_dir is None or Path(path).is_absolute():
        return path
    return str(Path(base_dir) / path)




# -- validation: each rule names the field it blames ------------------------------------------------

def validate(spec: ClusterSpec) -> None:
    """Raise SpecError for the first field that cannot work; return None when the spec is usable."""
    _check_catalog(spec)
    _check_hardware(spec)
    _check_engine(spec.engine)
    _check_pools(spec)
    _check_links(spec)
    _check_router(spec)
    _check_tenants(spec.tenants)
    _check_slo(spec.slo)
    _check_workload(spec)
    _check_ports(spec)


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise SpecError(field, reason)


def _positive(value: float | None, field: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    _require(value is not None and value > 0, field, f"must be > 0 (got {value!r})")


def _check_catalog(spec: ClusterSpec) -> None:
    if spec.catalog is None:
        return
    _require(Path(spec.catalog).is_file(), "catalog", f"file not found: {spec.catalog}")
    try:
        spec.catalog_data()
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SpecError("catalog", f"{spec.catalog}: {exc}") from None


def _known(field: str, lookup, name: str) -> None:
    try:
        lookup(name)
    except CatalogError as exc:
        raise SpecError(field, str(exc)) from None


def _check_hardware(spec: ClusterSpec) -> None:
    cat = spec.catalog_data()
    _known("model", cat.model, spec.model)
    _known("gpu", cat.gpu, spec.gpu)
    for field in ("weight_dtype", "kv_dtype"):
        value = getattr(spec, field)
        _require(value in DTYPE_BYTES, field, f"unknown dtype {value!r}; known: {', '.join(DTYPE_BYTES)}")
    _check_tp("tp", spec.tp)


def _check_tp(field: str, tp: int) -> None:
    power_of_two = tp >= 1 and tp & (tp - 1) == 0
    _require(power_of_two and tp <= MAX_TP, field,
             f"must be a power of two from 1 to {MAX_TP} (got {tp}): heads split evenly within one node")


def _check_engine(e: EngineSpec) -> None:
    # Trace blocks are 512 tokens (Mooncake); a KV block size that divides 512 keeps them aligned.
    _require(e.block_size >= 1 and 512 % e.block_size == 0, "engine.block_size",
             f"must be a power of two from 1 to 512 (got {e.block_size})")
    for field in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
        _positive(getattr(e, field), f"engine.{field}")
    _require(0 < e.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization",
             f"must be in (0, 1] (got {e.gpu_memory_utilization})")
    _require(e.max_waiting >= 0, "engine.max_waiting", f"must be >= 0 (got {e.max_waiting})")
    _require(e.activation_reserve_gb >= 0, "engine.activation_reserve_gb",
             f"must be >= 0 (got {e.activation_reserve_gb})")
    _require(e.swap_space_gb >= 0, "engine.swap_space_gb", f"must be >= 0 (got {e.swap_space_gb})")
    _require(e.host_kv_gb >= 0, "engine.host_kv_gb", f"must be >= 0 (got {e.host_kv_gb})")
    _require(e.time_scale >= 1, "engine.time_scale",
             f"must be >= 1 (got {e.time_scale}): below 1 the host would have to run faster than real time")
    _positive(e.lag_warn_s, "engine.lag_warn_s")
    _require(1 <= e.stream_interval <= MAX_STREAM_INTERVAL, "engine.stream_interval",
             f"must be in 1..{MAX_STREAM_INTERVAL} (got {e.stream_interval})")


def _check_pools(spec: ClusterSpec) -> None:
    _require(bool(spec.pools), "pools", "at least one [[pools]] entry is needed")
    names = [p.name for p in spec.pools]
    for i, pool in enumerate(spec.pools):
        at = f"pools[{i}]"
        _require(_POOL_NAME.fullmatch(pool.name) is not None, f"{at}.name",
                 f"{pool.name!r} must be lowercase letters, digits, '-' or '_' (it names workers and services)")
        _require(pool.name not in names[:i], f"{at}.name", f"duplicate pool name {pool.name!r}")
        _require(pool.count >= 1, f"{at}.count", f"must be >= 1 (got {pool.count})")
        if pool.gpu is not None:
            _known(f"{at}.gpu", spec.catalog_data().gpu, pool.gpu)
        if pool.tp is not None:
            _check_tp(f"{at}.tp", pool.tp)
        _check_fit(spec, i, pool)
    _check_roles(spec)


def _check_roles(spec: ClusterSpec) -> None:
    roles = {p.role for p in spec.pools}
    if roles == {"both"}:
        return
    _require("both" not in roles, "pools",
             "mixes 'both' with prefill/decode pools; a cluster is either colocated or disaggregated")
    for needed in ("prefill", "decode"):
        _require(needed in roles, "pools", f"disaggregated spec has no {needed} pool (role = \"{needed}\")")


def _check_fit(spec: ClusterSpec, i: int, pool: PoolSpec) -> None:
    """The model must fit with room for at least one max_model_len sequence of KV (vLLM refuses otherwise)."""
    field = f"pools[{i}].tp" if pool.tp else f"pools[{i}].gpu" if pool.gpu else "tp"
    dep, e = spec.deployment(pool), spec.engine
    kv_bytes = roofline.kv_pool_bytes_per_gpu(dep, e.gpu_memory_utilization, e.activation_reserve_gb)
    weights = roofline.weight_bytes_per_gpu(dep) / 1e9
    available = dep.gpu.hbm_gb * e.gpu_memory_utilization - e.activation_reserve_gb
    where = f"{dep.model.name} ({dep.weight_dtype}) at tp={dep.tp} on {dep.gpu.name}"
    _require(kv_bytes > 0, field,
             f"{where} does not fit: weights need {weights:.1f} GB/GPU vs {available:.1f} GB available "
             f"({e.gpu_memory_utilization} x {dep.gpu.hbm_gb:g} GB - {e.activation_reserve_gb:g} GB activations); "
             f"raise tp or use a larger GPU")
    need = spec.max_model_len * roofline.kv_bytes_per_token_per_gpu(dep)
    _require(kv_bytes >= need, field,
             f"{where} leaves {kv_bytes / 1e9:.1f} GB/GPU for KV after {weights:.1f} GB of weights, less than one "
             f"{spec.max_model_len}-token sequence needs ({need / 1e9:.1f} GB); raise tp or lower engine.max_model_len")


def _check_links(spec: ClusterSpec) -> None:
    cat = spec.catalog_data()
    for field in ("tp", "kv_transfer", "host_swap"):
        name = getattr(spec.links, field)
        if name is not None:
            _known(f"links.{field}", cat.link, name)
    for i, pool in enumerate(spec.pools):  # the default TP link comes from the GPU catalog entry
        if spec.links.tp is None:
            gpu = cat.gpu(pool.gpu or spec.gpu)
            _known(f"pools[{i}].gpu", cat.link, gpu.intra_node_link)


def _check_router(spec: ClusterSpec) -> None:
    r = spec.router
    _require(r.policy in POLICIES, "router.policy", f"unknown policy {r.policy!r}; known: {', '.join(POLICIES)}")
    _require(not spec.disaggregated or r.policy == "pd_pair", "router.policy",
             f"a disaggregated spec routes with \"pd_pair\" (a prefill and a decode worker), not {r.policy!r}")
    for field in ("max_input_tokens", "max_tokens_limit"):
        value = getattr(r, field)
        _positive(value, f"router.{field}")
        _require(value is None or value <= spec.max_model_len, f"router.{field}",
                 f"{value} exceeds the model length {spec.max_model_len}")
    _positive(r.processes, "router.processes")


def _check_tenants(tenants: list[TenantSpec]) -> None:
    owner: dict[str, str] = {}  # API key -> tenant; a later duplicate is the one blamed
    for i, t in enumerate(tenants):
        at = f"tenants[{i}]"
        _require(bool(t.name), f"{at}.name", "must not be empty")
        _require(t.name not in [u.name for u in tenants[:i]], f"{at}.name", f"duplicate tenant {t.name!r}")
        for key in t.api_keys:
            _require(bool(key), f"{at}.api_keys", "an API key must not be empty")
            _require(owner.get(key, t.name) == t.name, f"{at}.api_keys", f"API key {key!r} already belongs to "
                     f"tenant {owner.get(key)!r}")
            owner[key] = t.name
        for field in ("requests_per_s", "tokens_per_s", "max_concurrency"):
            _positive(getattr(t, field), f"{at}.{field}")


def _check_slo(slo: SloSpec) -> None:
    for field in ("ttft_p99_s", "itl_p99_s", "e2e_p99_s"):
        _positive(getattr(slo, field), f"slo.{field}")


def _check_workload(spec: ClusterSpec) -> None:
    from emulator import workload  # pure, no cycle: workload does not import the spec

    w = spec.workload
    for name, weight in w.mix.items():
        _require(name in workload.ARCHETYPES, f"workload.mix.{name}",
                 f"unknown archetype; known: {', '.join(workload.ARCHETYPES)}")
        _require(weight >= 0, f"workload.mix.{name}", f"weight must be >= 0 (got {weight})")
    _require(sum(w.mix.values()) > 0, "workload.mix", "needs at least one archetype with weight > 0")
    for name, overrides in w.params.items():
        _check_archetype_params(name, overrides)
    tenant_names = {t.name for t in spec.tenants}
    for name in w.tenants:
        _require(name in tenant_names, f"workload.tenants.{name}", "no such tenant in [[tenants]]")
    _positive(w.cv, "workload.cv", allow_none=False)
    for i, rate in enumerate(w.rates):
        _positive(rate, f"workload.rates[{i}]", allow_none=False)
    _positive(w.duration_s, "workload.duration_s", allow_none=False)
    _require(w.warmup_s >= 0, "workload.warmup_s", f"must be >= 0 (got {w.warmup_s})")
    _positive(w.num_requests, "workload.num_requests")


def _check_archetype_params(name: str, overrides: dict[str, Any]) -> None:
    from emulator import workload

    _require(name in workload.ARCHETYPES, f"workload.params.{name}",
             f"unknown archetype; known: {', '.join(workload.ARCHETYPES)}")
    try:
        workload.make_archetype(name, overrides)
    except (msgspec.ValidationError, ValueError) as exc:
        inner = _from_validation(exc) if isinstance(exc, msgspec.ValidationError) else SpecError("", str(exc))
        field = f"workload.params.{name}" + (f".{inner.field}" if inner.field not in ("", "<spec>") else "")
        raise SpecError(field, inner.reason) from None


def _check_ports(spec: ClusterSpec) -> None:
    owner = {spec.router.port: "the router"}
    _require(0 < spec.router.port < 65536, "router.port", f"must be 1-65535 (got {spec.router.port})")
    index = {p.name: i for i, p in enumerate(spec.pools)}
    for slot in spec.worker_list():
        field = f"pools[{index[slot.pool]}].base_port"
        _require(0 < slot.port < 65536, field, f"worker {slot.id} gets port {slot.port}, outside 1-65535")
        _require(slot.port not in owner, field, f"worker {slot.id} port {slot.port} is taken by {owner.get(slot.port)}")
        owner[slot.port] = f"worker {slot.id}"

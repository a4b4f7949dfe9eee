"""Hardware and model catalogs as data.

The built-in entries live in ``emulator/physics/data/*.toml`` (each number with its source); a user file
with the same tables adds or overrides entries by name (``load_catalog(extra=path)``).
"""
from __future__ import annotations

import bisect
import functools
from importlib import resources
from pathlib import Path

import msgspec

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}


class LayerProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Measured per-layer time of one model's GEMMs and elementwise kernels by tokens per step, at one TP
    degree (what Vidur's operator profiles hold). With one, a GPU's step time is the roofline corrected by
    the measured/roofline ratio interpolated between these token counts (emulator.physics.profiled)."""
    model: str
    tp: int
    tokens: tuple[int, ...]
    layer_ms: tuple[float, ...]
    source: str = ""

    def __post_init__(self):
        if len(self.tokens) < 2 or len(self.tokens) != len(self.layer_ms):
            raise ValueError("a layer profile needs two or more (tokens, layer_ms) points of equal length")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)):
            raise ValueError("layer profile tokens must increase")


class Gpu(msgspec.Struct, frozen=True, kw_only=True):
    """Peaks from the datasheet plus the coefficients of the per-operator step model (emulator.physics.operators).

    Optional coefficients default to "off" (0) or to the coarser field they refine, so a minimal entry
    still describes a plain roofline."""
    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_gb: float
    hbm_tb_s: float
    compute_efficiency: float              # large GEMMs: fraction of dense peak
    bandwidth_efficiency: float            # KV-cache reads (attention): fraction of HBM peak
    layer_overhead_us: float               # fixed per layer per step, beyond every operator's own time
    intra_node_link: str
    gemm_bandwidth_efficiency: float = 0.0     # weight streaming by GEMMs; 0: bandwidth_efficiency
    gemm_half_work: float = 0.0                # output elements per GPU at which a GEMM runs at half its peak
                                               # efficiency
    gemm_token_tile: int = 1                   # GEMM compute pads the token dimension to a multiple of this
                                               # (the output tile's height)
    gemm_tile_n: int = 0                       # the output tile's width (output features); with sm_count, GEMM
                                               # tiles run in whole waves over the SMs; 0: no wave model
    sm_count: int = 0                          # streaming multiprocessors (a GEMM wave is one tile per SM)
    gemm_alt_tile_n: int = 0                   # a narrower output tile the GEMM library may pick instead (its waves
                                               # fall elsewhere); each GEMM takes the faster tile. 0: one tile only
    gemm_alt_tile_efficiency: float = 1.0      # the narrower tile's throughput relative to the wide one's
    gemm_tail_fill: float = 0.0                # share of a partial last wave's idle SM time filled by work split
                                               # across SMs (stream-K); 0: whole waves
    gemm_overlap_norm: float = 0.0             # p: a GEMM's compute and weight streaming overlap as
                                               # (compute^p + memory^p)^(1/p); 0: max(compute, memory)
    kernel_latency_us: float = 0.0             # fixed time of each GEMM / attention kernel
    attention_efficiency: float = 0.0          # attention FLOPs: fraction of peak; 0: compute_efficiency
    elementwise_kernel_us: float = 0.0         # fixed time of each norm / rope / activation / add kernel
    elementwise_row_ns: float = 0.0            # per element of one token's row: norm, rope and activation kernels
                                               # run one thread block per token, so a few tokens take one row's
                                               # time; with it each such kernel takes max(fixed + row, traffic)
                                               # instead of fixed + traffic
    elementwise_bandwidth_efficiency: float = 0.0  # their traffic: fraction of HBM peak; 0: bandwidth_efficiency
    norm_bandwidth_efficiency: float = 0.0     # RMSNorm kernels' traffic; 0: elementwise_bandwidth_efficiency
    activation_bandwidth_efficiency: float = 0.0   # SiLU-and-mul; 0: elementwise_bandwidth_efficiency
    residual_bandwidth_efficiency: float = 0.0     # residual add; 0: elementwise_bandwidth_efficiency
    step_overhead_us: float = 0.0              # fixed per step: scheduling, input preparation, launch, host sync
    sequence_overhead_us: float = 0.0          # per sampled sequence per step: sampling, output processing
    profiles: tuple[LayerProfile, ...] = ()    # measured per-layer tables (calibration), by model and TP
    source: str = ""
    coefficient_sources: str = ""
    calibration: str = ""                      # the measurements the kernel coefficients were fitted to;
                                               # empty: uncalibrated (datasheet peaks, generic efficiencies)
    estimated: tuple[str, ...] = ()            # coefficients that are estimates: no measurement or published
                                               # figure behind them

    @property
    def calibration_note(self) -> str:
        """One line for plan and simulation output: how far this entry's step times can be trusted."""
        if not self.calibration:
            return (f"{self.name} step model: UNCALIBRATED (datasheet peaks with generic efficiency estimates; "
                    "fit it with `kvlab calibrate`)")
        estimated = f"; estimated, not measured: {', '.join(self.estimated)}" if self.estimated else ""
        return f"{self.name} step model: calibrated to {self.calibration}{estimated}"

    def profile_for(self, model: str, tp: int) -> LayerProfile | None:
        return next((p for p in self.profiles if p.model == model and p.tp == tp), None)

    def peak_flops(self, weight_dtype: str) -> float:
        """Dense FLOP/s for the weight dtype (fp8 weights run W8A8 GEMMs)."""
        tflops = self.fp8_tflops if weight_dtype == "fp8" else self.bf16_tflops
        return tflops * 1e12

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tb_s * 1e12


class AllReduceBand(msgspec.Struct, frozen=True, kw_only=True):
    """One band of payload sizes, from `from_bytes` up to the next band's: latency_us + payload / gb_s
    (algorithm bandwidth; gb_s 0: a flat latency_us)."""
    from_bytes: int
    latency_us: float
    gb_s: float = 0.0

    def us(self, payload_bytes: float) -> float:
        return self.latency_us + (payload_bytes / (self.gb_s * 1e3) if self.gb_s > 0 else 0.0)


class AllReduceFit(msgspec.Struct, frozen=True, kw_only=True):
    """All-reduce of a payload over `gpus` GPUs on a link: latency_us + payload / gb_s (algorithm
    bandwidth), and never under floor_us (small messages cost a flat time until bandwidth dominates).

    NCCL runs each size with whichever of its protocols it predicts fastest: low-latency ones for small
    and medium messages, a higher-latency, higher-bandwidth one for bulk transfers. With bulk_gb_s set,
    the time is the faster of the two lines (bulk_latency_us + payload / bulk_gb_s being the bulk one).

    With `bands`, each band of sizes has its own line instead: NCCL picks an (algorithm, protocol) per size
    from its own cost model (src/graph/tuning.cc: a base latency plus bytes over a bandwidth per pair), and
    the pair it picks is not always the fastest, so the measured time can fall where the choice changes (on
    8 x H100 with 4 GPUs: ~43 us at 1 MiB, ~33 us at 1.1-1.7 MiB). Bands follow such steps; one line cannot."""
    gpus: int
    latency_us: float
    gb_s: float
    floor_us: float = 0.0
    bulk_latency_us: float = 0.0
    bulk_gb_s: float = 0.0
    bands: tuple[AllReduceBand, ...] = ()

    def seconds(self, payload_bytes: float) -> float:
        if self.bands:
            i = bisect.bisect_right([b.from_bytes for b in self.bands], payload_bytes) - 1
            return self.bands[max(i, 0)].us(payload_bytes) * 1e-6
        line = self.latency_us + payload_bytes / (self.gb_s * 1e3)
        if self.bulk_gb_s > 0:
            line = min(line, self.bulk_latency_us + payload_bytes / (self.bulk_gb_s * 1e3))
        return max(self.floor_us, line) * 1e-6

    @property
    def peak_gb_s(self) -> float:
        return max(self.gb_s, self.bulk_gb_s, *(b.gb_s for b in self.bands))


class Link(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    gb_s: float
    latency_us: float
    allreduce: tuple[AllReduceFit, ...] = ()   # measured curves by GPU count; absent: a ring over gb_s
    source: str = ""

    def allreduce_fit(self, gpus: int) -> AllReduceFit | None:
        return next((a for a in self.allreduce if a.gpus == gpus), None)

    @property
    def bytes_per_s(self) -> float:
        return self.gb_s * 1e9

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


class Model(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_context: int
    experts: int = 1
    active_experts: int = 1
    tied_embeddings: bool = False
    source: str = ""

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def attn_params_per_layer(self) -> int:
        q_out = self.q_heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden

    @property
    def expert_params(self) -> int:
        """One SwiGLU MLP: gate, up and down projections."""
        return 3 * self.hidden * self.ffn

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden * self.experts if self.is_moe else 0

    @property
    def dense_params_per_layer(self) -> int:
        """Parameters every token touches in a layer (attention, MoE gate, norms)."""
        return self.attn_params_per_layer + self.router_params_per_layer + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        per_layer = self.dense_params_per_layer + self.experts * self.expert_params
        return self.layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def active_params(self) -> int:
        per_layer = self.dense_params_per_layer + self.active_experts * self.expert_params
        return self.layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def layer_matmul_params_active(self) -> int:
        """Matmul weights a token multiplies through, all layers (no embedding lookup, no lm head)."""
        return self.layers * (self.attn_params_per_layer + self.router_params_per_layer
                              + self.active_experts * self.expert_params)


class Catalog(msgspec.Struct, kw_only=True):
    gpus: dict[str, Gpu]
    links: dict[str, Link]
    models: dict[str, Model]

    def gpu(self, name: str) -> Gpu:
        return _lookup(self.gpus, name, "gpu")

    def link(self, name: str) -> Link:
        return _lookup(self.links, name, "link")

    def model(self, name: str) -> Model:
        return _lookup(self.models, name, "model")


class CatalogError(ValueError):
    pass


def _lookup(table: dict, name: str, kind: str):
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise CatalogError(f"unknown {kind} {name!r}; known: {known}") from None


class _CatalogFile(msgspec.Struct, kw_only=True):
    gpu: list[Gpu] = []
    link: list[Link] = []
    model: list[Model] = []


def _read(text: bytes | str) -> _CatalogFile:
    return msgspec.toml.decode(text, type=_CatalogFile)


@functools.lru_cache(maxsize=1)
def builtin_catalog() -> Catalog:
    data = resources.files("emulator.physics") / "data"
    parts = [_read(data.joinpath(f).read_bytes()) for f in ("gpus.toml", "interconnects.toml", "models.toml")]
    return _merge(Catalog(gpus={}, links={}, models={}), parts)


def load_catalog(extra: str | Path | None = None) -> Catalog:
    """The built-in catalog, extended (or overridden by name) with a user TOML file."""
    base = builtin_catalog()
    if extra is None:
        return base
    copy = Catalog(gpus=dict(base.gpus), links=dict(base.links), models=dict(base.models))
    return _merge(copy, [_read(Path(extra).read_bytes())])


def _merge(catalog: Catalog, parts: list[_CatalogFile]) -> Catalog:
    for part in parts:
        catalog.gpus.update({g.name: g for g in part.gpu})
        catalog.links.update({link.name: link for link in part.link})
        catalog.models.update({m.name: m for m in part.model})
    return catalog

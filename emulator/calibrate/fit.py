"""Fitting a GPU (and link) catalog entry's step-model coefficients to measurements. Pure: no I/O.

Coefficients are fitted by Nelder-Mead (on a log scale; efficiencies on a logit scale, so they stay
below 1) to the squared log error of predicted vs measured times, optionally plus a weight on the
worst row (a minimax pull, used for operator profiles whose acceptance bar is a per-row bound).
All-reduce curves fit max(floor, latency + bytes / bandwidth) per GPU count the same way, with a second
(bulk-protocol) line where it fits materially better; or size bands with a line each (where NCCL's choice
of protocol changes), kept per GPU count where they predict held-out sizes better.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import scipy.optimize

from emulator.calibrate.measurements import AllReduceRow, LayerRow, OperatorRow, StepRow, smoothed_allreduce
from emulator.physics.catalog import AllReduceBand, AllReduceFit, Gpu, Link, Model
from emulator.physics.deployment import BatchShape, Deployment
from emulator.physics.operators import OperatorModel, layer_gemms
from emulator.physics.steptime import build_model

# What each kind of measurement can identify (the rest stay at the base entry's values).
LAYER_FIELDS = ("compute_efficiency", "gemm_bandwidth_efficiency", "gemm_half_work", "kernel_latency_us",
                "elementwise_kernel_us", "elementwise_bandwidth_efficiency")
# Operator profiles time each GEMM and elementwise kernel apart: the GEMM terms are fitted to the GEMMs'
# time, the elementwise terms to each kernel's own (fit_elementwise), so neither absorbs the other's misfit.
GEMM_FIELDS = ("compute_efficiency", "gemm_bandwidth_efficiency", "gemm_half_work", "kernel_latency_us")
# The built-in H100 fit (benchmarks/fidelity.py --refit): the GEMM terms, wave-fill and tile choice and the
# overlap of compute with weight streaming included, to the per-layer rows once the elementwise terms are fitted.
LAYER_SHAPE_FIELDS = ("compute_efficiency", "kernel_latency_us", "gemm_bandwidth_efficiency", "gemm_tail_fill",
                      "gemm_alt_tile_efficiency", "gemm_overlap_norm")
# Whole steps: batch-1 decode at several contexts (intercept: fixed step cost; slope: KV bandwidth),
# decode batches (per-sequence cost), long prefills (GEMM and attention efficiency). The weight-read
# efficiency is not separable from the fixed step cost by step times alone, so it stays as given.
STEP_FIELDS = ("step_overhead_us", "sequence_overhead_us", "bandwidth_efficiency", "compute_efficiency",
               "attention_efficiency")


class FitResult(msgspec.Struct, kw_only=True):
    values: dict[str, float]
    measured_ms: list[float]
    fitted_ms: list[float]
    builtin_ms: list[float]
    labels: list[str]

    @property
    def errors(self) -> np.ndarray:
        return np.asarray(self.fitted_ms) / np.asarray(self.measured_ms) - 1.0

    @property
    def max_error(self) -> float:
        return float(np.max(np.abs(self.errors))) if self.labels else 0.0

    @property
    def rms_error(self) -> float:
        return float(np.sqrt(np.mean(self.errors ** 2))) if self.labels else 0.0


def minimize(f: Callable[[np.ndarray], float], x0: Sequence[float], iters: int = 2000,
             step: float = 0.3, restarts: int = 3) -> np.ndarray:
    """SciPy's Nelder-Mead from a simplex of side `step`, restarted from its best point (a collapsed
    simplex often stalls short of the minimum on these piecewise (max-of-terms) losses)."""
    x = np.asarray(x0, dtype=float)
    for _ in range(restarts):
        simplex = np.vstack([x] + [x + step * np.eye(len(x))[i] for i in range(len(x))])
        x = scipy.optimize.minimize(f, x, method="Nelder-Mead",
                                    options={"maxiter": iters, "initial_simplex": simplex,
                                             "xatol": 1e-9, "fatol": 1e-15}).x
    return x


def deployment(gpu: Gpu, model: Model, tp: int, link: Link | None) -> Deployment:
    return Deployment(model=model, gpu=gpu, tp=tp, tp_link=link if tp > 1 else None)


def step_shape(row: StepRow) -> BatchShape:
    shape = BatchShape()
    for _ in range(row.batch):
        shape.add(row.tokens, row.context)
    return shape


def predict_step_ms(gpu: Gpu, model: Model, link: Link | None, row: StepRow) -> float:
    return build_model(deployment(gpu, model, row.tp, link)).step_time(step_shape(row)).seconds * 1e3


@functools.lru_cache(maxsize=256)
def _operators(gpu: Gpu, model: Model, tp: int, link: Link | None) -> OperatorModel:
    """One operator model per candidate coefficients, model and TP degree (a fit asks for many rows each)."""
    return OperatorModel(deployment(gpu, model, tp, link))


def predict_layer_ms(gpu: Gpu, model: Model, link: Link | None, row: LayerRow) -> float:
    return _operators(gpu, model, row.tp, link).linear_layer(row.tokens).seconds * 1e3


def predict_gemm_ms(gpu: Gpu, model: Model, link: Link | None, row: LayerRow) -> float:
    """A dense layer's four GEMMs alone (what LayerRow.gemm_ms measures)."""
    op = _operators(gpu, model, row.tp, link)
    return sum(op.gemm(row.tokens, k, n).seconds for k, n in layer_gemms(model, row.tp)) * 1e3


def _start(gpu: Gpu, field: str) -> float:
    value = getattr(gpu, field)
    if value > 0:
        return value
    elementwise = gpu.elementwise_bandwidth_efficiency or gpu.bandwidth_efficiency
    fallbacks = {"gemm_bandwidth_efficiency": gpu.bandwidth_efficiency, "attention_efficiency": gpu.compute_efficiency,
                 "elementwise_bandwidth_efficiency": gpu.bandwidth_efficiency, "gemm_half_work": 1e6,
                 "norm_bandwidth_efficiency": elementwise, "activation_bandwidth_efficiency": elementwise,
                 "residual_bandwidth_efficiency": elementwise}
    fallbacks.update({"gemm_tail_fill": 0.2, "gemm_overlap_norm": 3.0, "elementwise_row_ns": 0.5})
    return fallbacks.get(field, 5.0)   # microsecond terms start at a few us


def _is_fraction(field: str) -> bool:
    return field.endswith("efficiency") or field == "gemm_tail_fill"


def _encode(field: str, value: float) -> float:
    """Fit coordinates: efficiencies on a logit scale (they stay in (0, 1)), the rest on a log scale."""
    if _is_fraction(field):
        value = min(max(value, 1e-6), 1 - 1e-6)
        return math.log(value / (1.0 - value))
    return math.log(value)


def _decode(field: str, x: float) -> float:
    if _is_fraction(field):
        return float(1.0 / (1.0 + math.exp(-x)))
    return float(math.exp(x))


def fit(gpu: Gpu, fields: Sequence[str], rows: Sequence, predict: Callable, labels: Sequence[str],
        minimax: float = 0.0, iters: int = 1500, hinge: tuple[float, float] = (0.0, 0.0)) -> FitResult:
    """Fit `fields` of `gpu` so predict(gpu, row) matches row.ms; returns values and per-row errors. The loss
    is the mean squared log error, plus minimax x the worst row's, plus (with hinge = (weight, margin)) weight
    x the mean squared excess of each row's |log error| over the margin (a pull on rows near a per-row bar)."""
    measured = np.array([r.ms for r in rows])

    def with_values(x: np.ndarray) -> Gpu:
        return msgspec.structs.replace(gpu, **{f: _decode(f, v) for f, v in zip(fields, x, strict=True)})

    def loss(x: np.ndarray) -> float:
        err = np.log(np.array([predict(with_values(x), r) for r in rows]) / measured)
        excess = np.maximum(np.abs(err) - hinge[1], 0.0)
        return float(np.mean(err ** 2) + minimax * np.max(np.abs(err)) ** 2 + hinge[0] * np.mean(excess ** 2))

    x = minimize(loss, [_encode(f, _start(gpu, f)) for f in fields], iters=iters)
    fitted = with_values(x)
    return FitResult(values={f: getattr(fitted, f) for f in fields}, labels=list(labels),
                     measured_ms=measured.tolist(), fitted_ms=[predict(fitted, r) for r in rows],
                     builtin_ms=[predict(gpu, r) for r in rows])


def fit_steps(gpu: Gpu, model: Model, link: Link | None, rows: Sequence[StepRow],
              fields: Sequence[str] = STEP_FIELDS) -> FitResult:
    labels = [f"{r.phase} batch {r.batch} tokens {r.tokens} context {r.context} tp {r.tp}" for r in rows]
    return fit(gpu, fields, rows, lambda g, r: predict_step_ms(g, model, link, r), labels)


def fit_layers(gpu: Gpu, model: Model, link: Link | None, rows: Sequence[LayerRow],
               fields: Sequence[str] = LAYER_FIELDS, minimax: float = 0.3) -> FitResult:
    labels = [f"{model.name} tp {r.tp} tokens {r.tokens}" for r in rows]
    return fit(gpu, fields, rows, lambda g, r: predict_layer_ms(g, model, link, r), labels, minimax=minimax)


def fit_layer_profiles(gpu: Gpu, link: Link | None, profiles: Sequence[tuple[Model, Sequence[LayerRow]]],
                       fields: Sequence[str] = LAYER_FIELDS, minimax: float = 0.3) -> FitResult:
    """One set of kernel coefficients for several models' layer profiles on the same GPU (how the
    built-in H100 and A100 entries were fitted: Llama-2-7B and Llama-2-70B together)."""
    pairs = [(m, r) for m, rows in profiles for r in rows]
    labels = [f"{m.name} tp {r.tp} tokens {r.tokens}" for m, r in pairs]
    rows = [r for _, r in pairs]
    model_of = {id(r): m for m, r in pairs}
    return fit(gpu, fields, rows, lambda g, r: predict_layer_ms(g, model_of[id(r)], link, r), labels,
               minimax=minimax)


# Vidur's elementwise columns by the kind of kernel the step model prices each as (elementwise_traffic order).
KERNEL_KIND = {"input_layernorm": 0, "post_attention_layernorm": 0, "attn_rope": 1, "mlp_act": 2, "add": 3}
KIND_FIELDS = ("norm_bandwidth_efficiency", "elementwise_bandwidth_efficiency", "activation_bandwidth_efficiency",
               "residual_bandwidth_efficiency")


def fit_elementwise(gpu: Gpu, profiles: Sequence[tuple[Model, Sequence[OperatorRow]]]) -> dict[str, float]:
    """Each elementwise kernel's time as one fixed cost (shared) plus its bytes over its own kind's bandwidth,
    by least squares on relative error over every kernel row: linear in (fixed s, 1 / bandwidth per kind), so
    exact and quick. Norms and the residual add both scale with the hidden size alone, so only their own
    columns tell them apart. An entry with elementwise_row_ns (one thread block per token) is fitted in that
    form instead (fit_elementwise_rows)."""
    if gpu.elementwise_row_ns > 0:
        return fit_elementwise_rows(gpu, profiles)
    cols = _kernel_columns(profiles)
    design = np.zeros((len(cols), 1 + len(KIND_FIELDS)))
    design[:, 0] = 1.0
    design[np.arange(len(cols)), 1 + cols[:, 0].astype(int)] = cols[:, 1] * cols[:, 2] / gpu.hbm_bytes_per_s
    sol = np.linalg.lstsq(design / cols[:, 4:5], np.ones(len(cols)), rcond=None)[0]
    values = {"elementwise_kernel_us": float(sol[0]) * 1e6}
    values.update({f: float(1.0 / max(inv, 1.0)) for f, inv in zip(KIND_FIELDS, sol[1:], strict=True)})
    return values   # (1 / inv capped at 1: a kernel partly served from L2 is still priced at HBM peak)


def _kernel_columns(profiles: Sequence[tuple[Model, Sequence[OperatorRow]]]):
    """(kind, tokens, traffic bytes per token, row elements, measured s) of every elementwise kernel row."""
    out = []
    for model, rows in profiles:
        for r in rows:
            kind = KERNEL_KIND.get(r.op)
            if kind is None or r.ms <= 0:
                continue
            traffic = OperatorModel.elementwise_traffic(model, r.tp)[kind] / (2 if kind == 0 else 1)  # 2 norms
            out.append((kind, r.tokens, traffic, OperatorModel.elementwise_rows(model, r.tp)[kind], r.ms * 1e-3))
    return np.array(out, dtype=float).reshape(-1, 5)


def fit_elementwise_rows(gpu: Gpu, profiles: Sequence[tuple[Model, Sequence[OperatorRow]]]) -> dict[str, float]:
    """Each kernel as max(fixed + row elements x row_ns, bytes / its kind's bandwidth) (one thread block per
    token: a few tokens take one row's time), by Nelder-Mead on the squared log error over every kernel row."""
    cols = _kernel_columns(profiles)
    kind, tokens, traffic, row, measured = cols.T
    kind = kind.astype(int)

    def predict(x: np.ndarray) -> np.ndarray:
        fixed, per_element = math.exp(x[0]) * 1e-6, math.exp(x[1]) * 1e-9
        eff = 1.0 / (1.0 + np.exp(-x[2:]))
        return np.maximum(fixed + per_element * row, tokens * traffic / (gpu.hbm_bytes_per_s * eff[kind]))

    def loss(x: np.ndarray) -> float:
        return float(np.mean(np.log(predict(x) / measured) ** 2))

    start = [math.log(max(gpu.elementwise_kernel_us, 0.5)), math.log(gpu.elementwise_row_ns)]
    start += [_encode(f, _start(gpu, f)) for f in KIND_FIELDS]
    x = minimize(loss, start, iters=4000)
    values = {"elementwise_kernel_us": math.exp(x[0]), "elementwise_row_ns": math.exp(x[1])}
    values.update({f: _decode(f, v) for f, v in zip(KIND_FIELDS, x[2:], strict=True)})
    return values


def fit_layer_shapes(gpu: Gpu, link: Link | None, profiles: Sequence[tuple[Model, Sequence[LayerRow]]],
                     fields: Sequence[str] = LAYER_SHAPE_FIELDS, iters: int = 600) -> FitResult:
    """The GEMM terms to whole per-layer rows (GEMMs + elementwise kernels as the entry prices them), squared
    log error plus a pull on rows past 12% (weight 200): the bar is every row within 15%. Nelder-Mead from the
    entry's values, so it refines a fit (the built-in H100 values came from a global search over this loss)."""
    pairs = [(m, r) for m, rows in profiles for r in rows]
    model_of = {id(r): m for m, r in pairs}
    return fit(gpu, fields, [r for _, r in pairs], lambda g, r: predict_layer_ms(g, model_of[id(r)], link, r),
               [f"{m.name} tp {r.tp} tokens {r.tokens}" for m, r in pairs], iters=iters, hinge=(200.0, 0.12))


def select_compute_efficiency(gpu: Gpu, link: Link | None, profiles: Sequence[tuple[Model, Sequence[LayerRow]]],
                              tolerance: float = 0.15, span: float = 0.06, step: float = 0.0025) -> float:
    """The GEMM efficiency (compute_efficiency) that leaves the fewest per-layer rows off by more than `tolerance`,
    ties to the smaller rms log error, scanned over `step`-wide values within `span` of the entry's. The bar
    is a per-row bound, which the smooth loss of fit_layer_shapes only approximates: the rows it leaves
    just past the bar sit on either side of the library's kernel switches, and one efficiency moves them all."""
    pairs = [(m, r) for m, rows in profiles for r in rows]
    measured = np.array([r.ms for _, r in pairs])
    centre = round(gpu.compute_efficiency / step) * step
    best: tuple[int, float] | None = None
    chosen = gpu.compute_efficiency
    for value in centre + step * np.arange(-round(span / step), round(span / step) + 1):
        if not 0.0 < value < 1.0:
            continue
        candidate = msgspec.structs.replace(gpu, compute_efficiency=float(value))
        ratio = np.array([predict_layer_ms(candidate, m, link, r) for m, r in pairs]) / measured
        score = (int(np.sum(np.abs(ratio - 1.0) > tolerance)), float(np.sqrt(np.mean(np.log(ratio) ** 2))))
        if best is None or score < best:
            best, chosen = score, float(value)
    return chosen


def fit_operator_profiles(gpu: Gpu, link: Link | None, profiles: Sequence[tuple[Model, Sequence[LayerRow]]],
                          kernels: Sequence[tuple[Model, Sequence[OperatorRow]]],
                          minimax: float = 0.0) -> tuple[FitResult, FitResult]:
    """The elementwise coefficients fitted to each kernel's own times, then the GEMM ones to the profiles' GEMM
    times (how the built-in H100 entry was fitted), so neither absorbs the other's misfit. Returns the GEMM
    fit and the whole layer with both applied (its per-row errors against the layer times)."""
    pairs = [(m, r) for m, rows in profiles for r in rows if r.gemm_ms > 0]
    labels = [f"{m.name} tp {r.tp} tokens {r.tokens}" for m, r in pairs]
    elementwise = fit_elementwise(gpu, kernels)
    gemm_rows = [msgspec.structs.replace(r, ms=r.gemm_ms) for _, r in pairs]
    model_of = {id(g): m for g, (m, _) in zip(gemm_rows, pairs, strict=True)}
    gemms = fit(gpu, GEMM_FIELDS, gemm_rows, lambda g, r: predict_gemm_ms(g, model_of[id(r)], link, r), labels,
                minimax=minimax)
    fitted = msgspec.structs.replace(gpu, **gemms.values, **elementwise)
    whole = FitResult(values={**gemms.values, **elementwise}, labels=labels, measured_ms=[r.ms for _, r in pairs],
                      fitted_ms=[predict_layer_ms(fitted, m, link, r) for m, r in pairs],
                      builtin_ms=[predict_layer_ms(gpu, m, link, r) for m, r in pairs])
    return gemms, whole


def fit_allreduce(rows: Sequence[AllReduceRow], minimax: float = 0.0, bulk_gain: float = 0.9) -> list[AllReduceFit]:
    """Per GPU count: max(floor, latency + bytes / bandwidth) by squared log error (plus, if asked, a pull on
    the worst row); then the same with a second, bulk-protocol line (the faster line wins), kept when it
    cuts the loss below `bulk_gain` of the one-line fit's."""
    fits = []
    for gpus in sorted({r.gpus for r in rows}):
        sel = [r for r in rows if r.gpus == gpus]
        t = np.array([r.ms * 1e3 for r in sel])                 # microseconds
        b = np.array([float(r.payload_bytes) for r in sel])

        def loss(x: np.ndarray, b: np.ndarray = b, t: np.ndarray = t) -> float:
            err = np.log(_allreduce_us(np.exp(x), b) / t)
            return float(np.mean(err ** 2) + minimax * np.max(np.abs(err)) ** 2)

        one = minimize(loss, [math.log(20.0), math.log(10.0), math.log(400.0)], iters=800)
        floor, lat, gb_s = np.exp(one)
        two = minimize(loss, [math.log(v) for v in (floor, lat, gb_s / 2, 3 * lat, 1.2 * gb_s)], iters=1500)
        x = np.exp(two) if loss(two) < bulk_gain * loss(one) else np.exp(one)
        fit_ = AllReduceFit(gpus=gpus, floor_us=round(float(x[0]), 2), latency_us=round(float(x[1]), 2),
                            gb_s=round(float(x[2]), 1))
        if len(x) == 5:
            fit_ = msgspec.structs.replace(fit_, bulk_latency_us=round(float(x[3]), 2), bulk_gb_s=round(float(x[4]), 1))
        fits.append(fit_)
    return fits


def _allreduce_us(x: np.ndarray, payload: np.ndarray) -> np.ndarray:
    """AllReduceFit.seconds in microseconds, vectorized: x = (floor, latency, GB/s[, bulk latency, bulk GB/s])."""
    line = x[1] + payload / (x[2] * 1e3)
    if len(x) == 5:
        line = np.minimum(line, x[3] + payload / (x[4] * 1e3))
    return np.maximum(x[0], line)


def fit_allreduce_bands(rows: Sequence[AllReduceRow], link_gb_s: float, max_bands: int = 5, min_sizes: int = 8,
                        gain: float = 0.1) -> list[AllReduceFit]:
    """Per GPU count: payload sizes cut into bands, each with its own latency + bytes / bandwidth line (the
    (algorithm, protocol) NCCL picks there), by least squares on relative error. The cuts are placed by
    dynamic programming over the sorted sizes (each band spans `min_sizes` or more); a band is added while
    it cuts the loss by `gain` or more, up to `max_bands`. No band's bus bandwidth, 2(t-1)/t of its
    algorithm bandwidth (a ring's traffic per GPU), exceeds the link's `link_gb_s` each way."""
    fits = []
    for gpus in sorted({r.gpus for r in rows}):
        sel = sorted((r for r in rows if r.gpus == gpus), key=lambda r: r.payload_bytes)
        x = np.array([float(r.payload_bytes) for r in sel])
        t = np.array([r.ms * 1e3 for r in sel])
        max_alg_gb_s = link_gb_s * gpus / (2.0 * (gpus - 1))
        cost, line = _band_costs(x, t, 1.0 / (max_alg_gb_s * 1e3), min_sizes)
        cuts = _best_cuts(cost, max_bands, gain)
        bands = []
        for i, j in zip(cuts, [*cuts[1:], len(x)], strict=True):
            a, b = line(i, j)
            bands.append(AllReduceBand(from_bytes=int(x[i]) if i else 0, latency_us=round(a, 2),
                                       gb_s=round(1.0 / (b * 1e3), 1)))
        first = bands[0]
        fits.append(AllReduceFit(gpus=gpus, latency_us=first.latency_us, gb_s=first.gb_s, bands=tuple(bands)))
    return fits


def _band_costs(x: np.ndarray, t: np.ndarray, b_min: float, min_sizes: int):
    """cost[i, j]: the least sum of squared relative errors of one line a + b x (a >= 0, b >= b_min, in us and
    us per byte) over rows i..j-1 (inf for bands under min_sizes rows); and line(i, j) -> (a, b). Normal
    equations from prefix sums, so every band's fit is O(1); where the free solution breaks a bound, the
    better of the two bounded ones."""
    u, v = 1.0 / t, x / t            # error of row k: a u_k + b v_k - 1

    def prefix(a: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(a)])

    sums = [prefix(w) for w in (u * u, u * v, v * v, u, v, np.ones_like(t))]

    def solve(i, j):
        suu, suv, svv, su, sv, s1 = (p[j] - p[i] for p in sums)

        def residual(a, b):
            return s1 - 2 * (a * su + b * sv) + a * a * suu + 2 * a * b * suv + b * b * svv

        det = np.maximum(suu * svv - suv * suv, 1e-300)
        a_free, b_free = (su * svv - sv * suv) / det, (sv * suu - su * suv) / det
        b_fixed = np.maximum(b_min, 0.0)
        a_fixed = np.maximum(0.0, (su - b_fixed * suv) / suu)     # b at its bound
        b_zero = np.maximum(b_min, sv / svv)                       # a at its bound
        options = [(a_fixed, b_fixed + 0 * a_fixed), (0 * b_zero, b_zero)]
        free_ok = (a_free >= 0) & (b_free >= b_min)
        options.append((np.where(free_ok, a_free, a_fixed), np.where(free_ok, b_free, b_fixed)))
        res = np.array([residual(a, b) for a, b in options])
        pick = np.argmin(res, axis=0)
        a = np.choose(pick, [o[0] for o in options])
        b = np.choose(pick, [o[1] for o in options])
        return np.min(res, axis=0), a, b

    n = len(x)
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    ok = j - i >= min_sizes
    cost = np.full((n + 1, n + 1), np.inf)
    cost[ok] = solve(i[ok], j[ok])[0]

    def line(i0: int, j0: int) -> tuple[float, float]:
        _, a, b = solve(np.array([i0]), np.array([j0]))
        return float(a[0]), float(b[0])

    return cost, line


def _best_cuts(cost: np.ndarray, max_bands: int, gain: float) -> list[int]:
    """Start rows of the bands: the least total cost for each band count (dynamic programming), keeping
    the fewest bands after which one more would cut the cost by less than `gain`."""
    n = cost.shape[0] - 1
    best = np.full((max_bands + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    arg = np.zeros((max_bands + 1, n + 1), dtype=int)
    for k in range(1, max_bands + 1):
        total = best[k - 1][:, None] + cost          # [i, j]: k - 1 bands to row i, then one band i..j
        arg[k] = np.argmin(total, axis=0)
        best[k] = total[arg[k], np.arange(n + 1)]
    k = 1
    while k < max_bands and best[k + 1, n] < (1.0 - gain) * best[k, n]:
        k += 1
    cuts, j = [], n
    for kk in range(k, 0, -1):
        j = int(arg[kk, j])
        cuts.append(j)
    return cuts[::-1]


class AllReduceChoice(msgspec.Struct, frozen=True):
    """Per GPU count: the curve kept and what each candidate scored on held-out sizes."""
    gpus: int
    kept: str                 # "bands" or "lines"
    bands_within: float       # share of held-out sizes within `tolerance`, fitted without them
    lines_within: float


def fit_allreduce_held_out(raw: Sequence[AllReduceRow], link_gb_s: float,
                           tolerance: float = 0.15) -> tuple[list[AllReduceFit], list[AllReduceChoice]]:
    """Banded lines or the one/two-line curve, per GPU count, whichever predicts sizes it was not fitted to
    better: both are fitted to every other measured size and scored on the rest (each half smoothed on its
    own, so no measurement is in both), then the winner is refitted to all sizes. Bands follow real steps
    where NCCL changes protocol, and also chase noise where single-size medians jump (2 GPUs, under ~6 MiB,
    where a size's own samples spread over 7-45 us); the held-out score tells which it does."""
    halves: list[list[AllReduceRow]] = [[], []]
    for gpus in sorted({r.gpus for r in raw}):
        sel = sorted((r for r in raw if r.gpus == gpus), key=lambda r: r.payload_bytes)
        halves[0] += sel[0::2]
        halves[1] += sel[1::2]
    train, test = (smoothed_allreduce(h) for h in halves)
    scores = {"bands": _within(fit_allreduce_bands(train, link_gb_s, min_sizes=4), test, tolerance),
              "lines": _within(fit_allreduce(train), test, tolerance)}
    every = smoothed_allreduce(list(raw))
    candidates = {"bands": fit_allreduce_bands(every, link_gb_s), "lines": fit_allreduce(every)}
    fits, choices = [], []
    for i, gpus in enumerate(sorted({r.gpus for r in raw})):
        kept = "bands" if scores["bands"][gpus] > scores["lines"][gpus] else "lines"
        fits.append(candidates[kept][i])
        choices.append(AllReduceChoice(gpus=gpus, kept=kept, bands_within=scores["bands"][gpus],
                                       lines_within=scores["lines"][gpus]))
    return fits, choices


def _within(fits: Sequence[AllReduceFit], rows: Sequence[AllReduceRow], tolerance: float) -> dict[int, float]:
    by = {f.gpus: f for f in fits}
    out = {}
    for gpus, f in by.items():
        errs = [abs(f.seconds(r.payload_bytes) * 1e3 / r.ms - 1) for r in rows if r.gpus == gpus]
        out[gpus] = float(np.mean(np.array(errs) <= tolerance))
    return out

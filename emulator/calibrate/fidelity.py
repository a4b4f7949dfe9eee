"""kvlab's step model against reference measurements: rows of (label, reference ms, kvlab ms).

Used by benchmarks/fidelity.py and by `kvlab calibrate`'s error tables. Pure apart from reading the
reference files (emulator.calibrate.measurements).
"""
from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from emulator.calibrate import measurements as ms
from emulator.datasets import dataset
from emulator.physics.catalog import Catalog, LayerProfile
from emulator.physics.deployment import Deployment
from emulator.physics.operators import layer_gemms
from emulator.physics.roofline import allreduce_seconds
from emulator.physics.steptime import build_model

# Vidur's profile folders for the catalog models they measured (data/profiling/compute/h100/...).
VIDUR_MODELS = {"Llama-2-7B": "meta-llama/Llama-2-7b-hf", "Llama-2-70B": "meta-llama/Llama-2-70b-hf"}
ALLREDUCE_TOPOLOGY = "h100_dgx"   # 8 x H100 SXM on NVSwitch: the NVLink4 fabric of an H100-SXM node


class Row(msgspec.Struct, frozen=True):
    group: str
    label: str
    reference_ms: float
    kvlab_ms: float

    @property
    def error(self) -> float:
        return self.kvlab_ms / self.reference_ms - 1.0


def profiles_dir(explicit: str | None = None) -> Path | None:
    """The Vidur profile folder: explicit, else profiles/vidur in the data folder (emulator.datasets)."""
    return Path(explicit) if explicit else dataset("profiles", "vidur")


def layer_rows(catalog: Catalog, gpu: str, link: str, model: str, path: Path) -> list[Row]:
    """Per-layer GEMM + elementwise time (all profiled TP degrees and token counts) vs kvlab's."""
    g, lk, m = catalog.gpu(gpu), catalog.link(link), catalog.model(model)
    rows = []
    for r in ms.read_layer_profile(path):
        dep = Deployment(model=m, gpu=g, tp=r.tp, tp_link=lk if r.tp > 1 else None)
        kvlab = build_model(dep).linear_layer(r.tokens).seconds * 1e3
        rows.append(Row(group=f"{model} tp{r.tp}", label=f"{r.tokens} tokens", reference_ms=r.ms, kvlab_ms=kvlab))
    return rows


def operator_rows(catalog: Catalog, gpu: str, link: str, model: str, path: Path) -> list[Row]:
    """Each GEMM of a layer, and the five elementwise kernels together, vs kvlab's operator of the same shape:
    where a layer row's error comes from. Grouped by model, TP degree and operator, in increasing tokens."""
    g, lk, m = catalog.gpu(gpu), catalog.link(link), catalog.model(model)
    by_key: dict[tuple[int, int], dict[str, float]] = {}
    for r in ms.read_operator_profile(path):
        by_key.setdefault((r.tp, r.tokens), {})[r.op] = r.ms
    rows = []
    for (tp, tokens), ops in by_key.items():
        op_model = build_model(Deployment(model=m, gpu=g, tp=tp, tp_link=lk if tp > 1 else None))
        label = f"{tokens} tokens"
        for op, (k, n) in zip(ms.GEMM_OPS, layer_gemms(m, tp), strict=True):
            rows.append(Row(group=f"{model} tp{tp} {op}", label=label, reference_ms=ops[op],
                            kvlab_ms=op_model.gemm(tokens, k, n).seconds * 1e3))
        rows.append(Row(group=f"{model} tp{tp} elementwise", label=label,
                        reference_ms=sum(v for op, v in ops.items() if op not in ms.GEMM_OPS),
                        kvlab_ms=op_model.elementwise(tokens).seconds * 1e3))
    return sorted(rows, key=lambda r: r.group)   # stable: each group keeps increasing token counts


def allreduce_rows(catalog: Catalog, gpu: str, link: str, path: Path, steady: float = 0.0) -> list[Row]:
    """One all-reduce per payload size and GPU count (running-median reference) vs kvlab's link curve.

    With `steady` > 0, only the sizes whose own samples agree within that fraction of their median, as a
    group of their own: on 2 GPUs under ~6 MiB one size's samples spread over 7-45 us (rank 0 waiting for
    its peer or not), a disagreement no curve in size can follow."""
    g, lk = catalog.gpu(gpu), catalog.link(link)
    model = next(iter(catalog.models.values()))
    rows = []
    for r in ms.smoothed_allreduce(ms.read_allreduce_profile(path)):
        if steady and r.spread > steady:
            continue
        dep = Deployment(model=model, gpu=g, tp=r.gpus, tp_link=lk)
        group = f"all-reduce {r.gpus} GPUs" + (", steady sizes" if steady else "")
        rows.append(Row(group=group, label=f"{r.payload_bytes / 1024:.0f} KiB",
                        reference_ms=r.ms, kvlab_ms=allreduce_seconds(dep, r.payload_bytes) * 1e3))
    return rows


class Summary(msgspec.Struct, frozen=True):
    group: str
    rows: int
    within: float        # fraction of rows within the tolerance
    max_error: float     # signed error of the worst row
    mean_error: float


def summarize(rows: list[Row], tolerance: float = 0.15) -> list[Summary]:
    out = []
    for group in dict.fromkeys(r.group for r in rows):
        errs = np.array([r.error for r in rows if r.group == group])
        worst = errs[np.argmax(np.abs(errs))]
        out.append(Summary(group=group, rows=len(errs), within=float(np.mean(np.abs(errs) <= tolerance)),
                           max_error=float(worst), mean_error=float(np.mean(errs))))
    return out


class MonotoneBound(msgspec.Struct, frozen=True):
    """How far a group's reference times fall as the row size grows (rows in increasing size)."""
    group: str
    best_error: float       # the smallest worst-row error any model non-decreasing in size can reach
    falls: int              # rows more than `tolerance` below an earlier (smaller) row


def monotone_bound(rows: list[Row], tolerance: float = 0.15) -> list[MonotoneBound]:
    """Per group, what no model whose time grows with tokens (or bytes) can avoid.

    A time model built from tiles, waves and bandwidth never gets faster with more work, so where the
    reference does (another library kernel chosen for that shape, or noise) some error is forced: for a pair
    i < j with r_i > r_j, the best a non-decreasing f can do is f_i = f_j = 2 r_i r_j / (r_i + r_j), an error
    of (r_i - r_j) / (r_i + r_j) on both; the worst pair bounds the whole group (weighted L-inf isotonic
    regression reaches that bound)."""
    out = []
    for group in dict.fromkeys(r.group for r in rows):
        ref = np.array([r.reference_ms for r in rows if r.group == group])
        gap = (ref[:, None] - ref[None, :]) / (ref[:, None] + ref[None, :])   # [i, j]: row i above row j
        best = float(np.max(np.triu(gap, k=1), initial=0.0))
        falls = int(np.sum(ref < (1.0 - tolerance) * np.maximum.accumulate(ref)))
        out.append(MonotoneBound(group=group, best_error=best, falls=falls))
    return out


def split_table(rows: list[ms.LayerRow], k: int) -> tuple[list[ms.LayerRow], list[ms.LayerRow]]:
    """(kept, held out) of one TP degree's rows in increasing tokens: a table of every k-th row (0, k, 2k, ...
    and the last), and the rest, each bracketed by two kept rows up to k - 1 rows away (never extrapolated)."""
    kept = [r for i, r in enumerate(rows) if i % k == 0 or i == len(rows) - 1]
    return kept, [r for r in rows if r not in kept]


def holdout_rows(model: str, path: Path, k: int = 2) -> list[Row]:
    """The measured table alone, interpolated linearly in tokens, on the token counts a table of every k-th
    profiled count leaves out (the baseline a calibrated model should beat)."""
    rows = []
    profile = ms.read_layer_profile(path)
    for tp in sorted({r.tp for r in profile}):
        kept, held = split_table([r for r in profile if r.tp == tp], k)
        xs, ys = [r.tokens for r in kept], [r.ms for r in kept]
        rows += [Row(group=f"{model} tp{tp} raw table held out", label=f"{r.tokens} tokens", reference_ms=r.ms,
                     kvlab_ms=float(np.interp(r.tokens, xs, ys))) for r in held]
    return rows


def cross_validated_rows(catalog: Catalog, gpu: str, link: str, model: str, path: Path, k: int = 2) -> list[Row]:
    """The calibrated step model (a LayerProfile on the GPU entry, emulator.physics.profiled) on the token
    counts its table does not hold: per TP degree the table keeps every k-th profiled count and the rest are
    predicted. (In-sample a table reproduces its own rows exactly, which checks nothing.)"""
    g, lk, m = catalog.gpu(gpu), catalog.link(link), catalog.model(model)
    profile = ms.read_layer_profile(path)
    rows = []
    for tp in sorted({r.tp for r in profile}):
        kept, held = split_table([r for r in profile if r.tp == tp], k)
        table = LayerProfile(model=model, tp=tp, tokens=tuple(r.tokens for r in kept),
                             layer_ms=tuple(r.ms for r in kept), source=f"{path}, every {k}th row")
        dep = Deployment(model=m, gpu=msgspec.structs.replace(g, profiles=(table,)), tp=tp,
                         tp_link=lk if tp > 1 else None)
        step_model = build_model(dep)
        rows += [Row(group=f"{model} tp{tp} held out", label=f"{r.tokens} tokens", reference_ms=r.ms,
                     kvlab_ms=step_model.linear_layer(r.tokens).seconds * 1e3) for r in held]
    return rows

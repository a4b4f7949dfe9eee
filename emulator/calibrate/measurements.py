"""Reference measurements kvlab's step model is fitted to or compared with, and readers for them.

- LayerRow: one layer's GEMM + elementwise time at a token count (Vidur ``mlp.csv`` operator profiles);
- OperatorRow: one operator of that layer (a GEMM or an elementwise kernel) at a token count;
- AllReduceRow: one all-reduce of a payload over some GPUs (Vidur ``all_reduce.csv``);
- StepRow: a whole engine step (a CSV ``phase,batch,tokens,context,tp,ms`` or live probes).

Vidur's files (github.com/microsoft/vidur, data/profiling) hold CUDA-event times in milliseconds, one
column ``time_stats.<op>.median`` per operator. All-reduce ``size`` is already in bytes: the profiler
allocates N fp16 elements and records size = 2N (vidur/profiling/collectives/collectives_wrapper.py), and
Vidur's own predictor reads it back as bytes (tokens = size / hidden / 2). Each all-reduce time is the
median, over 3 samples, of the NCCL kernels of 11 back-to-back eager launches as rank 0 sees them (kineto),
so a kernel that waits for a late peer counts its wait. A Llama layer is QKV + rope + O + two RMSNorms +
gate/up + SiLU-and-mul + down + one residual add (vidur/entities/execution_time.py sums the same operators
per block).
Reading is bounded: files over MAX_BYTES are refused.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import msgspec

MAX_BYTES = 64 * 1024 * 1024
LAYER_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
STEP_COLUMNS = ("phase", "batch", "tokens", "context", "tp", "ms")


class LayerRow(msgspec.Struct, frozen=True):
    tp: int
    tokens: int
    ms: float
    gemm_ms: float = 0.0


class OperatorRow(msgspec.Struct, frozen=True):
    """One operator's median time (a Vidur ``time_stats.<op>.median`` column) at a token count and TP degree."""
    tp: int
    tokens: int
    op: str
    ms: float


class AllReduceRow(msgspec.Struct, frozen=True):
    gpus: int
    payload_bytes: int
    ms: float
    spread: float = 0.0     # (max - min) / median of this size's own samples: how far they disagree


class StepRow(msgspec.Struct, frozen=True, kw_only=True):
    """A whole step: `batch` sequences, each adding `tokens` new tokens over `context` cached ones."""
    phase: str            # "prefill" or "decode"
    batch: int
    tokens: int
    context: int
    tp: int
    ms: float


class MeasurementError(ValueError):
    pass


def _rows(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if path.stat().st_size > MAX_BYTES:
        raise MeasurementError(f"{path}: larger than {MAX_BYTES // 2**20} MiB")
    return list(csv.DictReader(io.StringIO(path.read_text())))


def read_layer_profile(path: str | Path) -> list[LayerRow]:
    """Per-layer GEMM + elementwise medians from a Vidur mlp.csv (duplicate token counts: first kept)."""
    out: dict[tuple[int, int], LayerRow] = {}
    for r in _rows(path):
        try:
            key = (int(r["num_tensor_parallel_workers"]), int(r["num_tokens"]))
            ms = sum(float(r[f"time_stats.{op}.median"]) for op in LAYER_OPS)
            gemm = sum(float(r[f"time_stats.{op}.median"]) for op in GEMM_OPS)
        except (KeyError, ValueError) as exc:
            raise MeasurementError(f"{path}: not a Vidur mlp profile ({exc})") from None
        out.setdefault(key, LayerRow(tp=key[0], tokens=key[1], ms=ms, gemm_ms=gemm))
    return sorted(out.values(), key=lambda row: (row.tp, row.tokens))


def read_operator_profile(path: str | Path) -> list[OperatorRow]:
    """Every layer operator's median from a Vidur mlp.csv, one row per (tp, tokens, op); first duplicate kept."""
    out: dict[tuple[int, int, str], OperatorRow] = {}
    for r in _rows(path):
        try:
            tp, tokens = int(r["num_tensor_parallel_workers"]), int(r["num_tokens"])
            for op in LAYER_OPS:
                out.setdefault((tp, tokens, op), OperatorRow(tp=tp, tokens=tokens, op=op,
                                                             ms=float(r[f"time_stats.{op}.median"])))
        except (KeyError, ValueError) as exc:
            raise MeasurementError(f"{path}: not a Vidur mlp profile ({exc})") from None
    return sorted(out.values(), key=lambda row: (row.tp, row.tokens, LAYER_OPS.index(row.op)))


def read_allreduce_profile(path: str | Path) -> list[AllReduceRow]:
    rows = []
    for r in _rows(path):
        try:
            if r.get("collective", "all_reduce") != "all_reduce" or r.get("rank", "0") != "0":
                continue
            if r.get("devices_per_node", r["num_workers"]) != r["num_workers"]:
                continue   # a group spread over nodes; a TP group sits in one node (as Vidur's predictor selects)
            median = float(r["time_stats.all_reduce.median"])
            low = float(r.get("time_stats.all_reduce.min") or median)
            high = float(r.get("time_stats.all_reduce.max") or median)
            rows.append(AllReduceRow(gpus=int(r["num_workers"]), payload_bytes=int(r["size"]), ms=median,
                                     spread=(high - low) / median if median > 0 else 0.0))
        except (KeyError, ValueError) as exc:
            raise MeasurementError(f"{path}: not a Vidur all_reduce profile ({exc})") from None
    return rows


def read_step_table(path: str | Path) -> list[StepRow]:
    """phase,batch,tokens,context,tp,ms (tokens: new tokens per sequence; context: cached per sequence)."""
    rows = []
    for i, r in enumerate(_rows(path), start=2):
        try:
            phase = r["phase"].strip().lower()
            if phase not in ("prefill", "decode"):
                raise ValueError(f"phase {phase!r}")
            tokens = int(r.get("tokens") or (1 if phase == "decode" else 0))
            row = StepRow(phase=phase, batch=int(r["batch"]), tokens=tokens, context=int(r.get("context") or 0),
                          tp=int(r.get("tp") or 1), ms=float(r["ms"]))
        except (KeyError, ValueError) as exc:
            raise MeasurementError(f"{path} line {i}: {exc} (columns: {', '.join(STEP_COLUMNS)})") from None
        if row.batch < 1 or row.tokens < 1 or row.context < 0 or row.tp < 1 or row.ms <= 0:
            raise MeasurementError(f"{path} line {i}: batch, tokens, tp and ms must be positive")
        rows.append(row)
    return rows


def write_step_table(rows: list[StepRow]) -> str:
    lines = [",".join(STEP_COLUMNS)]
    lines += [f"{r.phase},{r.batch},{r.tokens},{r.context},{r.tp},{r.ms:.6g}" for r in rows]
    return "\n".join(lines) + "\n"


def smoothed_allreduce(rows: list[AllReduceRow], window: int = 9) -> list[AllReduceRow]:
    """Each size's time replaced by the median over `window` neighbouring sizes (same GPU count).

    Vidur's small-message all-reduce medians jump between ~7 and ~45 us from one size to the next
    (run-to-run noise of single CUDA-graph launches), so fits and comparisons use the running median.
    """
    out = []
    for gpus in sorted({r.gpus for r in rows}):
        sel = sorted((r for r in rows if r.gpus == gpus), key=lambda r: r.payload_bytes)
        half = window // 2
        for i, r in enumerate(sel):
            near = sorted(x.ms for x in sel[max(0, i - half): i + half + 1])
            out.append(AllReduceRow(gpus=gpus, payload_bytes=r.payload_bytes, ms=near[len(near) // 2], spread=r.spread))
    return out

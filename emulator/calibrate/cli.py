"""`kvlab calibrate`: fit a GPU catalog entry's step-model coefficients to an engine, write a user catalog.

Sources (one or more):
  --steps FILE.csv        whole-step times: phase,batch,tokens,context,tp,ms
  --vidur-mlp FILE.csv    Vidur operator profile of --model (per-layer GEMM + elementwise, by tokens and TP)
  --vidur-allreduce FILE  Vidur all-reduce profile (fits the link's latency/bandwidth curve)
  --endpoint URL          a live OpenAI-compatible server, probed with crafted requests
Output: a TOML catalog with the fitted GPU (and link) entry, provenance, and a per-row error table
(measured vs fitted vs the entry it started from); load it with --catalog in `kvlab up/sim/plan/worker`.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import msgspec

from emulator.calibrate import fit as cal
from emulator.calibrate import measurements as ms
from emulator.physics.catalog import CatalogError, Gpu, LayerProfile, Link, load_catalog


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="Llama-3.1-8B", help="catalog model the measurements ran")
    parser.add_argument("--gpu", default="H100-SXM", help="catalog GPU entry to start from")
    parser.add_argument("--link", help="catalog link for TP all-reduces (default: the GPU's intra-node link)")
    parser.add_argument("--catalog", help="user catalog TOML to start from")
    parser.add_argument("--name", help="name of the fitted GPU entry (default: the --gpu name, overriding it)")
    parser.add_argument("--steps", help="CSV of whole-step times (phase,batch,tokens,context,tp,ms)")
    parser.add_argument("--vidur-mlp", help="Vidur mlp.csv operator profile of --model")
    parser.add_argument("--vidur-allreduce", help="Vidur all_reduce.csv profile")
    parser.add_argument("--profile-tables", action="store_true",
                        help="with --vidur-mlp: also store the measured per-layer tables (step times: the roofline "
                             "times the measured/roofline ratio, interpolated between profiled token counts)")
    parser.add_argument("--endpoint", help="base URL of a live OpenAI-compatible server to probe")
    parser.add_argument("--served-model", help="model name the endpoint serves (default: --model)")
    parser.add_argument("--tp", type=int, default=1, help="TP degree of the live endpoint")
    parser.add_argument("--time-scale", type=float, default=1.0, help="endpoint wall time per model second (emulators)")
    parser.add_argument("--save-steps", help="write the probed step rows to this CSV")
    parser.add_argument("--out", help="output TOML (default: stdout)")


def run(args: argparse.Namespace) -> int:
    try:
        text = calibrate(args)
    except (CatalogError, ms.MeasurementError, OSError, ValueError, RuntimeError) as exc:
        print(f"kvlab calibrate: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def calibrate(args: argparse.Namespace) -> str:
    if not (args.steps or args.vidur_mlp or args.vidur_allreduce or args.endpoint):
        raise ValueError("give at least one of --steps, --vidur-mlp, --vidur-allreduce, --endpoint")
    catalog = load_catalog(args.catalog)
    gpu, model = catalog.gpu(args.gpu), catalog.model(args.model)
    link = catalog.link(args.link or gpu.intra_node_link)
    start = gpu
    notes: list[str] = []
    tables: list[tuple[str, cal.FitResult]] = []
    if args.vidur_allreduce:
        fits, choices = cal.fit_allreduce_held_out(ms.read_allreduce_profile(args.vidur_allreduce), link.gb_s)
        kept = "; ".join(f"{c.gpus} GPUs: {c.kept} (held-out sizes within 15%: bands {c.bands_within:.1%}, "
                         f"lines {c.lines_within:.1%})" for c in choices)
        link = msgspec.structs.replace(link, allreduce=tuple(fits),
                                       source=f"all-reduce fitted to {args.vidur_allreduce}; {kept}")
        notes.append(f"all-reduce curve: {args.vidur_allreduce}")
    if args.vidur_mlp:
        rows = ms.read_layer_profile(args.vidur_mlp)
        kernels = ms.read_operator_profile(args.vidur_mlp)
        gemms, layers = cal.fit_operator_profiles(gpu, link, [(model, rows[::2] if len(rows) > 400 else rows)],
                                                  [(model, kernels)])
        gpu = msgspec.structs.replace(gpu, **layers.values)
        tables.append(("GEMMs (Vidur profile, every other row)", gemms))
        tables.append(("per-layer GEMM + elementwise, elementwise fitted per kernel (Vidur profile)", layers))
        notes.append(f"kernel coefficients: {args.vidur_mlp}")
        if args.profile_tables:
            gpu = msgspec.structs.replace(gpu, profiles=_profiles(gpu, model.name, rows, args.vidur_mlp))
    step_rows = ms.read_step_table(args.steps) if args.steps else []
    if args.endpoint:
        from emulator.calibrate.probe import probe  # network I/O only on this path
        probed = probe(args.endpoint, args.served_model or args.model, args.tp, time_scale=args.time_scale)
        if args.save_steps:
            Path(args.save_steps).write_text(ms.write_step_table(probed))
        step_rows += probed
        notes.append(f"step probes: {args.endpoint}")
    if step_rows:
        result = cal.fit_steps(gpu, model, link, step_rows)
        gpu = msgspec.structs.replace(gpu, **result.values)
        tables.append(("whole steps", result))
        if args.steps:
            notes.append(f"step table: {args.steps}")
    fitted = {field for _, result in tables for field in result.values}
    gpu = msgspec.structs.replace(gpu, name=args.name or gpu.name,
                                  coefficient_sources=f"kvlab calibrate from {start.name}: " + "; ".join(notes),
                                  calibration=_calibration(start, tables, notes),
                                  estimated=tuple(f for f in start.estimated if f not in fitted))
    return render(gpu, link if args.vidur_allreduce else None, model.name, tables, start)


def _calibration(start: Gpu, tables: list[tuple[str, cal.FitResult]], notes: list[str]) -> str:
    """What the entry is now calibrated to: this run's kernel or step fits, else what it started with
    (an all-reduce fit alone changes the link, not the GPU's coefficients)."""
    return "; ".join(notes) if tables else start.calibration


def _profiles(gpu: Gpu, model: str, rows: list[ms.LayerRow], source: str) -> tuple[LayerProfile, ...]:
    keep = [p for p in gpu.profiles if p.model != model]
    for tp in sorted({r.tp for r in rows}):
        sel = [r for r in rows if r.tp == tp]
        keep.append(LayerProfile(model=model, tp=tp, tokens=tuple(r.tokens for r in sel),
                                 layer_ms=tuple(round(r.ms, 5) for r in sel), source=source))
    return tuple(keep)


# -- TOML output ---------------------------------------------------------------------------------

def _value(v) -> str:
    if isinstance(v, str):
        return msgspec.json.encode(v).decode()   # a JSON string is a valid TOML basic string
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(round(v, 6))
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, msgspec.Struct):
        return _inline(v)
    return str(v)


def _inline(struct) -> str:
    """A struct as a TOML inline table (empty lists left out: their defaults)."""
    items = [(k, v) for k, v in msgspec.structs.asdict(struct).items() if not (isinstance(v, (tuple, list)) and not v)]
    return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in items) + " }"


def _table(header: str, struct, skip: tuple[str, ...] = ()) -> list[str]:
    lines = [header]
    for field, v in msgspec.structs.asdict(struct).items():
        if field not in skip and not (isinstance(v, (tuple, list)) and not v):
            lines.append(f"{field} = {_value(v)}")
    return lines


def render(gpu: Gpu, link: Link | None, model: str, tables: list[tuple[str, cal.FitResult]], start: Gpu) -> str:
    today = datetime.date.today().isoformat()
    out = [f"# kvlab calibrate, {today}: {gpu.coefficient_sources}", f"# model measured: {model}"]
    for title, result in tables:
        out += [f"# fit: {title}: {len(result.labels)} rows, rms error {result.rms_error:.1%}, "
                f"max {result.max_error:.1%}; fitted " + ", ".join(f"{k} = {v:.4g}" for k, v in result.values.items())]
    out += ["", *_table("[[gpu]]", gpu, skip=("profiles",))]
    for p in gpu.profiles:
        out += ["", *_table("[[gpu.profiles]]", p)]
    if link is not None:
        out += ["", *_table("[[link]]", link, skip=("allreduce",)), "allreduce = ["]
        out += [f"  {_inline(a)}," for a in link.allreduce]
        out += ["]"]
    for title, result in tables:
        out += ["", f"# per-row error table: {title} (ms; error of fitted and of {start.name} vs measured)",
                f"# {'row':<52} {'measured':>10} {'fitted':>10} {'error':>8} {'built-in':>10} {'error':>8}"]
        for label, m, f, b in zip(result.labels, result.measured_ms, result.fitted_ms, result.builtin_ms, strict=True):
            out.append(f"# {label:<52} {m:>10.4f} {f:>10.4f} {f / m - 1:>+8.1%} {b:>10.4f} {b / m - 1:>+8.1%}")
    return "\n".join(out) + "\n"

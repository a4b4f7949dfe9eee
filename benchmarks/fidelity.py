"""kvlab's step model against Vidur's H100 operator profiles: per row reference ms, kvlab ms, error; summary.

    .venv/bin/python benchmarks/fidelity.py [--catalog calibrated.toml] [--gpu H100-SXM] [--rows all|powers|none]
        [--profiles PATH/TO/vidur] [--device h100|a100] [--ops] [--cross-validate K] [--refit]

The A100 entry is compared the same way with Vidur's A100 files (not bundled: take data/profiling/compute/a100
and data/profiling/network/a100_dgx from github.com/microsoft/vidur into one folder), e.g.
    benchmarks/fidelity.py --profiles vidur --device a100 --gpu A100-80GB-SXM --link NVLink3

Reference datasets (Vidur, MIT; see shared/data/profiles/README.md):
- Llama-2-7B and Llama-2-70B per-layer GEMM + elementwise time, TP 1/2/4/8, 1..4096 tokens;
- NCCL all-reduce on an 8 x H100 SXM NVSwitch node (h100_dgx), 2/4/8 GPUs, 2 KiB..64 MiB payloads
  (running median over 9 neighbouring sizes: single small-message medians are noisy); then again over the
  "steady sizes" alone, whose own samples agree within the tolerance.
With --ops, each GEMM and the elementwise kernels are compared on their own as well. With --cross-validate K,
a calibrated catalog's profile tables (`kvlab calibrate --profile-tables`) are checked honestly: each
interior token count is predicted from a table built without its fold ("held out"), next to the measured
table interpolated alone ("raw table held out"). Each group's summary
also says what any model non-decreasing in tokens or bytes could reach on it (reference non-monotonicity).
With --refit, the GPU entry's kernel coefficients are refitted to the profiles first (the elementwise terms to their
own kernels' columns, then the GEMM terms to the layer rows: emulator.calibrate.fit.fit_layer_shapes, a few
minutes, and last the GEMM efficiency by the count of rows outside the tolerance: select_compute_efficiency) and the
rows compared with the refitted entry; the values are printed for the catalog.
Then a few whole-step figures kvlab predicts (decode intercept and slope, per-sequence cost, a mixed step).
"""
from __future__ import annotations

import argparse
import sys

import msgspec

from emulator.calibrate import fidelity, fit
from emulator.calibrate import measurements as ms
from emulator.physics import roofline
from emulator.physics.catalog import Catalog, load_catalog
from emulator.physics.steptime import step_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", help="user catalog TOML (e.g. from `kvlab calibrate`)")
    parser.add_argument("--gpu", default="H100-SXM")
    parser.add_argument("--link", default="NVLink4")
    parser.add_argument("--rows", choices=("all", "powers", "none"), default="powers",
                        help="per-row lines: every row, token counts / sizes that are powers of two, or none")
    parser.add_argument("--profiles", help="Vidur profile folder (default: $KVLAB_DATA_DIR/profiles/vidur)")
    parser.add_argument("--device", default="h100", help="Vidur device folder: compute/<device>, network/<device>_dgx")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--ops", action="store_true",
                        help="also: each GEMM and the elementwise kernels alone (where a layer's error comes from)")
    parser.add_argument("--cross-validate", type=int, metavar="K", default=0,
                        help="also: the calibrated model (roofline x a profile table's interpolated ratio) and the raw "
                             "table alone, each on the profiled token counts held out of its table (K folds)")
    parser.add_argument("--refit", action="store_true",
                        help="refit the GPU entry's kernel coefficients to the profiles first and print them")
    args = parser.parse_args()
    base = fidelity.profiles_dir(args.profiles)
    if base is None:
        print("no Vidur profiles found; pass --profiles", file=sys.stderr)
        return 2
    catalog = load_catalog(args.catalog)
    if args.refit:
        catalog = _refit(catalog, args.gpu, args.link, base, args.device)
    rows = []
    for model, folder in fidelity.VIDUR_MODELS.items():
        mlp = base / "compute" / args.device / folder / "mlp.csv"
        rows += fidelity.layer_rows(catalog, args.gpu, args.link, model, mlp)
        rows += fidelity.operator_rows(catalog, args.gpu, args.link, model, mlp) if args.ops else []
        if args.cross_validate:
            k = args.cross_validate
            rows += fidelity.cross_validated_rows(catalog, args.gpu, args.link, model, mlp, k)
            rows += fidelity.holdout_rows(model, mlp, k)
    allreduce = base / "network" / f"{args.device}_dgx" / "all_reduce.csv"
    rows += fidelity.allreduce_rows(catalog, args.gpu, args.link, allreduce)
    rows += fidelity.allreduce_rows(catalog, args.gpu, args.link, allreduce, steady=args.tolerance)
    _print_rows(rows, args.rows)
    _print_summary(fidelity.summarize(rows, args.tolerance), fidelity.monotone_bound(rows, args.tolerance),
                   args.tolerance)
    _print_step_figures(catalog, args.gpu)
    return 0


def _refit(catalog, gpu_name: str, link_name: str, base, device: str):
    """The catalog with the GPU entry's elementwise and GEMM terms refitted to both models' profiles."""
    gpu, link = catalog.gpu(gpu_name), catalog.link(link_name)
    layers, kernels = [], []
    for model, folder in fidelity.VIDUR_MODELS.items():
        mlp = base / "compute" / device / folder / "mlp.csv"
        layers.append((catalog.model(model), ms.read_layer_profile(mlp)))
        kernels.append((catalog.model(model), ms.read_operator_profile(mlp)))
    gpu = msgspec.structs.replace(gpu, **fit.fit_elementwise(gpu, kernels))
    result = fit.fit_layer_shapes(gpu, link, layers)
    gpu = msgspec.structs.replace(gpu, **result.values)
    gpu = msgspec.structs.replace(gpu, compute_efficiency=fit.select_compute_efficiency(gpu, link, layers))
    print("refitted", gpu.name, {k: round(v, 4) for k, v in {**fit.fit_elementwise(gpu, kernels), **result.values,
                                                               "compute_efficiency": gpu.compute_efficiency}.items()})
    return Catalog(gpus={**catalog.gpus, gpu.name: gpu}, links=catalog.links, models=catalog.models)


def _is_power(label: str) -> bool:
    n = int(float(label.split()[0]))
    return n > 0 and n & (n - 1) == 0


def _print_rows(rows, mode: str) -> None:
    if mode == "none":
        return
    print(f"{'group':<26} {'row':>14} {'reference ms':>13} {'kvlab ms':>10} {'error':>8}")
    for r in rows:
        if mode == "all" or _is_power(r.label):
            print(f"{r.group:<26} {r.label:>14} {r.reference_ms:>13.4f} {r.kvlab_ms:>10.4f} {r.error:>+8.1%}")
    print()


def _print_summary(summaries, bounds, tolerance: float) -> None:
    """Per group; `monotone best`: the smallest worst-row error any model whose time never falls as tokens
    (bytes) grow could reach on this reference, and `falls`: reference rows more than the tolerance below
    an earlier, smaller row (what a tile/wave/bandwidth model cannot follow)."""
    bound = {b.group: b for b in bounds}
    tol = format(tolerance, ".0%")
    print(f"{'summary':<36} {'rows':>5} {'within ' + tol:>11} {'outside':>8} {'worst':>8} {'mean':>8} "
          f"{'monotone best':>14} {'falls':>6}")
    for s in summaries:
        b = bound[s.group]
        outside = s.rows - round(s.within * s.rows)
        print(f"{s.group:<36} {s.rows:>5} {s.within:>11.1%} {outside:>8} {s.max_error:>+8.1%} {s.mean_error:>+8.1%} "
              f"{b.best_error:>14.1%} {b.falls:>6}")
    print()


def _print_step_figures(catalog, gpu: str) -> None:
    """Whole-step figures of the model (no whole-step reference data is bundled to compare with)."""
    print("whole steps predicted by kvlab (ms)")
    for name in ("Llama-2-7B", "Llama-3.1-8B"):
        dep = roofline.Deployment(model=catalog.model(name), gpu=catalog.gpu(gpu))
        b1 = roofline.decode_time(dep, [0]).seconds * 1e3
        slope = (roofline.decode_time(dep, [1000] * 8).seconds - roofline.decode_time(dep, [0] * 8).seconds) * 1e3 / 8
        per_seq = (roofline.decode_time(dep, [512] * 64).seconds
                   - roofline.decode_time(dep, [512] * 32).seconds) * 1e3 / 32
        decodes = roofline.batch_shape((1, 1024) for _ in range(64))
        mixed = step_time(dep, roofline.batch_shape([(512, 0)] + [(1, 1024)] * 64)).seconds * 1e3
        print(f"  {name:<13} decode batch 1: {b1:.2f}  per 1K context tokens: {slope:.3f}  per extra sequence "
              f"(ctx 512): {per_seq:.3f}  prefill 2K: {roofline.prefill_time(dep, 2048).seconds * 1e3:.1f}  "
              f"64 decodes @1K: {step_time(dep, decodes).seconds * 1e3:.2f} (+512-token chunk: {mixed:.2f})")


if __name__ == "__main__":
    sys.exit(main())

"""Comparing the step model with reference profiles: per-operator rows, and the bound that reference
non-monotonicity puts on any model whose time grows with the work."""
from pathlib import Path

import numpy as np
import pytest

from emulator.calibrate import fidelity
from emulator.calibrate import measurements as ms
from emulator.physics.catalog import builtin_catalog

CAT = builtin_catalog()
VIDUR = fidelity.profiles_dir()
needs_profiles = pytest.mark.skipif(VIDUR is None, reason="Vidur profiles not present")
# Layer rows outside 15% per (model, TP degree) with the built-in H100 entry: a ceiling, so a change that
# moves more rows out fails here (lower it when a change brings rows in).
# (Split-K partial sums, a second tile shape, wave-tail fill and the compute/streaming overlap took the total from
# 73 to 37; 70B TP1 went from 9 to 10 and 70B TP2 from 8 to 15, rows at 296-384 tokens straddling a step the
# library takes at 328.)
OUTSIDE_15 = {"Llama-2-7B tp1": 5, "Llama-2-7B tp2": 0, "Llama-2-7B tp4": 1, "Llama-2-7B tp8": 2,
              "Llama-2-70B tp1": 10, "Llama-2-70B tp2": 15, "Llama-2-70B tp4": 2, "Llama-2-70B tp8": 2}


def rows(*refs: float, group: str = "g") -> list[fidelity.Row]:
    return [fidelity.Row(group=group, label=f"{i} tokens", reference_ms=r, kvlab_ms=r) for i, r in enumerate(refs)]


def test_a_non_decreasing_reference_forces_no_error():
    (bound,) = fidelity.monotone_bound(rows(1.0, 1.0, 1.5, 2.0))
    assert bound.best_error == 0.0 and bound.falls == 0


def test_a_fall_forces_the_error_of_its_worst_pair_on_any_non_decreasing_model():
    (bound,) = fidelity.monotone_bound(rows(0.5, 1.0, 0.9, 0.8, 1.2))
    assert bound.best_error == pytest.approx(0.2 / 1.8)       # the pair (1.0, 0.8)
    assert bound.falls == 1                                    # 0.8 is more than 15% under 1.0
    flat = 2 * 1.0 * 0.8 / 1.8                                 # the model that reaches the bound on that pair
    assert flat / 1.0 - 1 == pytest.approx(-bound.best_error) and flat / 0.8 - 1 == pytest.approx(bound.best_error)


def test_groups_are_bounded_separately():
    bounds = fidelity.monotone_bound(rows(1.0, 0.5, group="a") + rows(1.0, 2.0, group="b"))
    assert [b.group for b in bounds] == ["a", "b"] and bounds[0].best_error > 0 and bounds[1].best_error == 0


def test_operator_columns_sum_to_the_layer_row(tmp_path: Path):
    header = ["num_tensor_parallel_workers", "num_tokens"] + [f"time_stats.{op}.median" for op in ms.LAYER_OPS]
    values = [["1", "8"] + [str(0.01 * (i + 1)) for i in range(len(ms.LAYER_OPS))],
              ["2", "8"] + [str(0.02 * (i + 1)) for i in range(len(ms.LAYER_OPS))]]
    path = tmp_path / "mlp.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *values]) + "\n")
    ops = ms.read_operator_profile(path)
    assert len(ops) == 2 * len(ms.LAYER_OPS)
    for layer in ms.read_layer_profile(path):
        mine = [o for o in ops if (o.tp, o.tokens) == (layer.tp, layer.tokens)]
        assert sum(o.ms for o in mine) == pytest.approx(layer.ms)
        assert sum(o.ms for o in mine if o.op in ms.GEMM_OPS) == pytest.approx(layer.gemm_ms)


@needs_profiles
@pytest.mark.parametrize("model", list(fidelity.VIDUR_MODELS))
def test_h100_layer_rows_outside_15_percent_do_not_grow(model: str):
    path = VIDUR / "compute/h100" / fidelity.VIDUR_MODELS[model] / "mlp.csv"
    layer = fidelity.layer_rows(CAT, "H100-SXM", "NVLink4", model, path)
    for s in fidelity.summarize(layer):
        assert s.rows - round(s.within * s.rows) <= OUTSIDE_15[s.group], s
        assert abs(s.max_error) < 0.25, s


@needs_profiles
@pytest.mark.parametrize("model", list(fidelity.VIDUR_MODELS))
def test_h100_elementwise_kernels_track_their_own_columns(model: str):
    """Each operator is priced on its own: the elementwise kernels are not inflated to make up for the GEMMs."""
    path = VIDUR / "compute/h100" / fidelity.VIDUR_MODELS[model] / "mlp.csv"
    for s in fidelity.summarize(fidelity.operator_rows(CAT, "H100-SXM", "NVLink4", model, path)):
        if s.group.endswith("elementwise"):
            assert s.within >= 0.7 and abs(s.mean_error) < 0.06, s
        else:
            assert abs(s.mean_error) < 0.15, s


@needs_profiles
@pytest.mark.parametrize("model", list(fidelity.VIDUR_MODELS))
def test_per_operator_rows_add_up_to_the_layer_rows(model: str):
    path = VIDUR / "compute/h100" / fidelity.VIDUR_MODELS[model] / "mlp.csv"
    layer = {(r.group, r.label): r for r in fidelity.layer_rows(CAT, "H100-SXM", "NVLink4", model, path)}
    summed: dict[tuple[str, str], list[float]] = {}
    for r in fidelity.operator_rows(CAT, "H100-SXM", "NVLink4", model, path):
        key = (" ".join(r.group.split()[:2]), r.label)
        acc = summed.setdefault(key, [0.0, 0.0])
        acc[0] += r.reference_ms
        acc[1] += r.kvlab_ms
    assert summed.keys() == layer.keys()
    for key, (ref, mine) in summed.items():
        assert ref == pytest.approx(layer[key].reference_ms) and mine == pytest.approx(layer[key].kvlab_ms), key


@needs_profiles
def test_layer_references_leave_room_for_a_monotone_model_within_15_percent():
    """Whole-layer reference times fall with more tokens by at most ~18%, so the best non-decreasing model
    stays within ~10%: rows outside 15% are the model's, not forced by the reference."""
    for model, folder in fidelity.VIDUR_MODELS.items():
        layer = fidelity.layer_rows(CAT, "H100-SXM", "NVLink4", model, VIDUR / "compute/h100" / folder / "mlp.csv")
        for b in fidelity.monotone_bound(layer):
            assert b.best_error < 0.15, b


def test_a_table_of_every_kth_row_brackets_each_held_out_row():
    layer = [ms.LayerRow(tp=1, tokens=n, ms=float(n)) for n in (1, 2, 4, 8, 16, 24, 32)]
    kept, held = fidelity.split_table(layer, 3)
    assert [r.tokens for r in kept] == [1, 8, 32] and [r.tokens for r in held] == [2, 4, 16, 24]
    assert fidelity.split_table(layer, 1) == (layer, [])


@needs_profiles
@pytest.mark.parametrize("model", list(fidelity.VIDUR_MODELS))
def test_profile_tables_predict_token_counts_they_do_not_hold(model: str):
    """The calibrated model checked out of sample: with every other profiled count in its table, the counts
    left out are predicted within 15% (one row at most per TP degree outside, where cuBLAS picks another
    kernel for that one shape), and better than interpolating the measured times alone."""
    path = VIDUR / "compute/h100" / fidelity.VIDUR_MODELS[model] / "mlp.csv"
    calibrated = fidelity.cross_validated_rows(CAT, "H100-SXM", "NVLink4", model, path, k=2)
    raw = fidelity.holdout_rows(model, path, k=2)
    for s in fidelity.summarize(calibrated):
        assert s.rows > 100 and s.rows - round(s.within * s.rows) <= 1 and abs(s.max_error) < 0.2, s
    assert [r.label for r in calibrated] == [r.label for r in raw]          # the same held-out rows
    assert max(abs(r.error) for r in calibrated) < max(abs(r.error) for r in raw)
    assert np.mean([abs(r.error) for r in calibrated]) < 0.9 * np.mean([abs(r.error) for r in raw])

"""Small things a newcomer trips over: compare --limit 0/all, --live leaving no reports/ behind and a
progress bar with a real total, plan without --price, sim warning on deep overload."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvlab.cli import main
from loadtests.compare_live import replay_wall_s
from tests import ROOT
from tests.conftest import tiny_test_on_free_ports


@pytest.fixture
def tiny_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 500 * i, "input_length": 40, "output_length": 4,
                                        "hash_ids": [i % 2]}) + "\n" for i in range(5)))
    return path


@pytest.mark.parametrize("limit", ["0", "all", "ALL"])
def test_compare_limit_zero_or_all_replays_the_whole_trace(limit, tiny_trace, capsys):
    assert main(["compare", "tiny-test", "--trace", str(tiny_trace), "--policies", "round_robin",
                 "--limit", limit]) == 0
    out = capsys.readouterr().out
    assert "all 5 requests" in out
    row = next(line for line in out.splitlines() if line.startswith("round_robin"))
    assert row.split()[6] != "0.00"   # thru/s: requests were actually replayed


def test_compare_live_progress_counts_to_the_replays_length(tiny_trace):
    # 5 requests 0.5 s apart: 2 s of trace, 4 wall s at time scale 2, 1 s at speedup 4
    assert replay_wall_s(tiny_trace, None, 1.0, 2.0) == pytest.approx(4.0)
    assert replay_wall_s(tiny_trace, 3, 4.0, 2.0) == pytest.approx(0.5)


def _tiny_spec_on_free_ports(folder: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(tiny_test_on_free_ports()[0])
    return path


def test_compare_live_without_out_leaves_no_reports_folder(tmp_path, tiny_trace):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    spec = _tiny_spec_on_free_ports(tmp_path)
    done = subprocess.run([sys.executable, "-m", "kvlab.cli", "compare", str(spec), "--trace", str(tiny_trace),
                           "--policies", "round_robin", "--live", "--time-scale", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round_robin" in done.stdout and "live" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml", "trace.jsonl"]


def test_plan_without_price_says_pass_price(capsys):
    assert main(["plan", "--rate", "2"]) == 0
    out = capsys.readouterr().out
    assert "pass --price" in out and "$0.00/h" not in out
    assert main(["plan", "--rate", "2", "--price", "2"]) == 0
    assert "/h" in capsys.readouterr().out


def test_sim_warns_on_deep_overload_and_not_on_light_load(capsys, tmp_path):
    # tiny-test's bounded queue rejects before TTFT reaches 10x its 1 s SLO; a 0.1 s SLO shows overload sooner
    from emulator.spec import example_spec_path
    spec = tmp_path / "tight.toml"
    spec.write_text(example_spec_path("tiny-test").read_text().replace("ttft_p99_s = 1.0", "ttft_p99_s = 0.1"))
    assert main(["sim", str(spec), "--rate", "400", "--requests", "600"]) == 0
    err = capsys.readouterr().err
    assert "overloads this cluster" in err and "--rate" in err
    assert main(["sim", str(spec), "--rate", "0.5", "--requests", "20"]) == 0
    assert "overload" not in capsys.readouterr().err

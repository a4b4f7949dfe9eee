"""kvlab's load generators read the time scale from a kvlab router's GET /cluster, say so first, and take
--time-scale over it; against any other server they keep 1 (or the spec's). Locust runs in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.fake_openai import FakeOpenAI
from loadtests.records import read_records
from tests import ROOT


@pytest.fixture
def tiny_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 10 * i, "input_length": 40, "output_length": 3, "hash_ids": [i]} for i in range(3)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _run(locustfile: str, host: str, tmp_path: Path, *extra: str) -> tuple[dict, list[str]]:
    """(the records' start event, kvlab's log lines) of one short headless run."""
    records = tmp_path / f"records-{len(list(tmp_path.iterdir()))}.jsonl"
    cmd = [sys.executable, "-m", "locust", "--headless", "--only-summary", "-f", locustfile, "--host", host,
           "--records", str(records), "--api", "completions", "--run-time", "20s", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    start, _ = read_records(records)
    return start, [line for line in done.stderr.splitlines() if "kvlab.load" in line]


@pytest.mark.parametrize("locustfile,args", [
    ("loadtests/trace_user.py", ("--trace", "TRACE", "--speedup", "100")),
    ("loadtests/open_loop.py", ("--rate", "20", "--stages", "20:0.3")),
])
def test_the_time_scale_comes_from_the_routers_cluster_view_and_the_first_log_line_says_so(
        tmp_path, tiny_trace, locustfile, args):
    fake = FakeOpenAI(ttft_s=0.01, gap_s=0.002, tokens=3, cluster_time_scale=4.0).start()
    try:
        args = tuple(str(tiny_trace) if a == "TRACE" else a for a in args)
        start, logs = _run(locustfile, fake.url, tmp_path, *args)
        assert start["time_scale"] == 4.0
        assert logs and "time scale 4 (from " + fake.url + "/cluster)" in logs[0], logs
        start, logs = _run(locustfile, fake.url, tmp_path, *args, "--time-scale", "2")
        assert start["time_scale"] == 2.0 and "time scale 2 (from --time-scale)" in logs[0]
    finally:
        fake.stop()


def test_a_server_without_a_cluster_view_runs_at_time_scale_one(tmp_path, tiny_trace):
    fake = FakeOpenAI(ttft_s=0.01, gap_s=0.002, tokens=3).start()   # answers /cluster with its model list
    try:
        start, logs = _run("loadtests/trace_user.py", fake.url, tmp_path, "--trace", str(tiny_trace),
                           "--speedup", "100")
        assert start["time_scale"] == 1.0 and "time scale 1 (from default" in logs[0]
    finally:
        fake.stop()


def test_locusts_table_shows_the_servers_milliseconds(tmp_path, tiny_trace):
    """A stub kvlab router at time scale 4 answering its first token after 0.4 wall s: Locust's TTFT row
    reads about 100 (emulated) ms, not 400."""
    fake = FakeOpenAI(ttft_s=0.4, gap_s=0.002, tokens=3, cluster_time_scale=4.0).start()
    try:
        # closed-loop users: each waits for its answers, so the run ends with them counted
        _run("loadtests/locustfile.py", fake.url, tmp_path, "--mix", "chat=1", "-u", "2", "-r", "2",
             "--run-time", "4s", "--csv", str(tmp_path / "locust"))
    finally:
        fake.stop()
    import csv
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "locust_stats.csv"))}
    assert ("TTFT", "chat") in rows, list(rows)
    ttft = float(rows[("TTFT", "chat")]["Median Response Time"])
    assert 95 <= ttft < 200, ttft

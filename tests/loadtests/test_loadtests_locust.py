"""kvlab's locustfiles under plain `locust --headless`, against a stub server with exact timing.

Locust monkeypatches the standard library with gevent when imported, so it only ever runs in a
subprocess here; the dispatcher and schedules are tested in-process (gevent without patching).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import gevent
import numpy as np
import pytest

from emulator import traces
from loadtests.dispatch import OpenLoop
from loadtests.fake_openai import FakeOpenAI
from loadtests.records import read_records
from loadtests.schedule import Stage, open_loop_requests, profile_stages, users_at
from tests import ROOT


@pytest.fixture
def fake():
    server = FakeOpenAI(ttft_s=0.02, gap_s=0.005, tokens=20).start()   # 20 tokens: ~0.1 s a request
    yield server
    server.stop()


def locust(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "--headless", "--only-summary", "--loglevel", "WARNING", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# -- in-process: schedules and the dispatcher --------------------------------------------------------

def test_open_loop_sends_on_schedule_however_slow_the_responses():
    sent: list[float] = []

    def slow_send(item, extra):
        sent.append(extra["sched"] + extra["lag"])
        gevent.sleep(0.5)   # every response takes 0.5 s: a closed loop of one user would send 2/s

    schedule = [(i * 0.02, i) for i in range(40)]   # 50/s for 0.8 s
    stats = OpenLoop(slow_send).run(schedule)
    assert stats.sent == 40 and stats.dropped == 0 and stats.in_flight == 0
    # A send that waited for a response would be 0.5 s late or more (a closed loop: 20 s for all 40);
    # half that leaves a busy host's scheduling delays room without letting one through.
    assert max(abs(s - i * 0.02) for i, s in enumerate(sent)) < 0.25
    assert stats.max_lag_s < 0.25


def test_open_loop_drops_and_counts_arrivals_beyond_its_in_flight_cap():
    dropped = []
    loop = OpenLoop(lambda item, extra: gevent.sleep(0.3), max_in_flight=5,
                    on_drop=lambda item, extra: dropped.append(item))
    stats = loop.run([(i * 0.001, i) for i in range(8)])
    assert stats.sent == 5 and stats.dropped == 3 and dropped == [5, 6, 7]


def test_measured_until_stops_once_earlier_requests_finish_keeping_load_on_meanwhile():
    finished = []

    def send(item, extra):
        gevent.sleep(0.3 if item == 0 else 0.01)
        finished.append(item)

    schedule = [(i * 0.05, i) for i in range(100)]   # 5 s of arrivals; only the first 0.1 s is measured
    stats = OpenLoop(send).run(schedule, measured_until=0.1)
    assert 0 in finished and 1 in finished
    assert 4 <= stats.sent <= 9          # ~0.3 s of tail load while request 0 finished, then stop


def test_step_and_burst_profiles_and_their_arrival_counts():
    assert profile_stages(10, "step", 2.5, 60, 20, 120) == [Stage(10, 60), Stage(25, 60)]
    assert profile_stages(10, "burst", 3, 60, 20, 120) == [Stage(10, 60), Stage(30, 20), Stage(10, 40)]
    items = open_loop_requests([Stage(20, 10), Stage(60, 10)], time_scale=2.0, mix={"chat": 1.0}, seed=1)
    per_stage = np.bincount([k for _, _, k in items])
    # 20 req/s of emulated time for 10 wall s at time scale 2 = 5 emulated s = ~100 requests, then ~300
    assert per_stage[0] == pytest.approx(100, abs=35) and per_stage[1] == pytest.approx(300, abs=60)
    assert all(at == pytest.approx(r.arrival_s * 2.0) for at, r, _ in items)


def test_closed_loop_shapes_step_and_burst_the_user_count():
    assert [users_at(t, "step", 10, 2.5, 60, 20) for t in (0, 59, 60, 500)] == [10, 10, 25, 25]
    assert [users_at(t, "burst", 10, 3, 60, 20) for t in (0, 60, 79, 80)] == [10, 30, 30, 10]


# -- Locust subprocesses ----------------------------------------------------------------------------

@pytest.mark.slow
def test_open_loop_locustfile_writes_one_record_per_scheduled_request(fake, tmp_path):
    records = tmp_path / "r.jsonl"
    done = locust("-f", "loadtests/open_loop.py", "--host", fake.url, "--stages", "20:2,40:1,40:2",
                  "--measured-until", "3", "--records", str(records), "--mix", "chat=1", "--run-time", "40s")
    assert done.returncode == 0, done.stderr[-2000:]
    header, rows = read_records(records)
    measured = [r for r in rows if r["measured"]]
    assert header["model"] == "fake-model" and len(measured) == sum(header["per_stage"][:2])
    assert all(r["status"] == 200 and not r["unfinished"] for r in measured)
    # Requests left on schedule (loose: a busy host delays a greenlet, it does not skip one)...
    assert np.median([r["lag"] for r in rows]) < 0.25
    # ...and TTFT is measured from the send: never below the stub's 20 ms to its first token.
    assert np.median([r["ttft"] for r in measured]) >= 0.02


@pytest.mark.slow
def test_closed_loop_locustfile_reports_ttft_itl_e2e_and_tokens_rows(fake, tmp_path):
    # An agent's second turn starts within ~3.5 s (first turn, then 0.5-2 s of thinking): 7 s leave a
    # busy host's slow start room (4 s once ended before any agent got there).
    done = locust("-f", "loadtests/locustfile.py", "--host", fake.url, "-u", "4", "-r", "4", "-t", "7s",
                  "--mix", "chat=1,agentic=1", "--csv", str(tmp_path / "s"), "--api-key", "sk-test")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "s_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for kind in ("TTFT", "ITL", "E2E", "TOKENS"):
        assert int(rows[(kind, "chat")]["Request Count"]) > 0
    assert float(rows[("TTFT", "chat")]["Median Response Time"]) >= 20   # the stub's first token comes at 20 ms
    assert all(body["_auth"] == "Bearer sk-test" for body in fake.received)
    turns = [b for b in fake.received if len(b["messages"]) > 2]   # agent turns resend their history
    assert any(m["role"] == "assistant" and m["content"].startswith(" tok") for b in turns for m in b["messages"])


@pytest.mark.skipif(traces.shared_trace() is None, reason="the shared Mooncake trace (../shared/data/traces) is absent")
def test_trace_replay_sends_prompts_that_share_the_traces_prefix_blocks(fake, tmp_path):
    records = tmp_path / "t.jsonl"
    done = locust("-f", "loadtests/trace_user.py", "--host", fake.url, "--trace", str(traces.shared_trace()),
                  "--trace-limit", "12", "--speedup", "1000", "--records", str(records), "--api", "completions",
                  "--run-time", "30s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_records(records)[1]) == 12
    trace = traces.read_trace(traces.shared_trace(), limit=12)
    prompts = {len(b["prompt"].split()): b["prompt"] for b in fake.received}
    a, b = trace[0], trace[1]          # both start with hash id 0: one shared 512-token block
    pa, pb = prompts[a.input_length], prompts[b.input_length]
    assert pa.split()[:512] == pb.split()[:512] and pa.split()[512] != pb.split()[512]
    assert [x["max_tokens"] for x in fake.received] and all(x.get("ignore_eos") for x in fake.received)


def test_requests_still_streaming_when_the_schedule_ends_are_cut_short_not_lost():
    ended = []

    def send(item, extra):
        try:
            gevent.sleep(5.0)          # far longer than the schedule
        finally:
            ended.append(item)         # the sender sees GreenletExit and can record what it has

    stats = OpenLoop(send).run([(0.0, "a"), (0.05, "b"), (0.1, "tail")], measured_until=0.08)
    assert sorted(ended) == ["a", "b", "tail"] and stats.in_flight == 0

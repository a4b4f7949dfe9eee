"""Simulator runs side by side in child processes give what they give one after the other, in order."""
from emulator.spec import load_spec
from loadtests import parallel_runs, sim_curve


def test_a_curve_run_in_child_processes_equals_the_same_curve_run_here(monkeypatch):
    spec = load_spec("tiny-test")
    rates = [20.0, 60.0, 40.0]   # not sorted: the points come back in the rates' order
    side_by_side = sim_curve.curve(spec, rates, 100)
    monkeypatch.setattr(parallel_runs, "MAX_PROCESSES", 1)
    here = sim_curve.curve(spec, rates, 100)
    assert side_by_side == here
    assert side_by_side[0] != side_by_side[1]   # each point is its own rate's


def test_one_run_or_one_core_stays_in_this_process(monkeypatch):
    monkeypatch.setattr(parallel_runs.os, "cpu_count", lambda: 2)
    assert [parallel_runs.processes(n) for n in (1, 2, 5)] == [1, 2, 2]
    monkeypatch.setattr(parallel_runs.os, "cpu_count", lambda: 1)
    assert parallel_runs.processes(5) == 1
    calls = []
    assert parallel_runs.run_all(lambda x: calls.append(x) or x * 2, [(1,), (2,)]) == [2, 4]
    assert calls == [1, 2]   # a lambda cannot go to a child: it ran here, in order

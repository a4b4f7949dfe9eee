"""The suite's three phases (tests/conftest.py): tests that mostly wait four at a time, CPU-bound ones two
at a time, wall-clock-sensitive ones alone."""
from __future__ import annotations

from types import SimpleNamespace

from tests import ROOT
from tests.conftest import PURE_PATHS, phase_of


def _item(path: str, marks=()):
    return SimpleNamespace(path=ROOT / path, config=SimpleNamespace(rootpath=ROOT),
                           get_closest_marker=lambda name: object() if name in marks else None)


def test_waiting_tests_cpu_bound_tests_and_solo_tests_each_have_their_phase():
    assert phase_of(_item("tests/emulator/planner/test_planner.py")) == "pure"
    assert phase_of(_item("tests/repo/test_static_gate.py")) == "pure"
    assert phase_of(_item("tests/router/test_router_api.py")) == "parallel"
    assert phase_of(_item("tests/loadtests/test_sweep.py")) == "parallel"
    assert phase_of(_item("tests/loadtests/test_sweep.py", marks=["solo"])) == "serial"
    assert phase_of(_item("tests/emulator/sim/test_sim_live_equivalence.py", marks=["solo"])) == "serial"


def test_every_pure_path_names_a_file_or_folder_that_exists():
    for path in PURE_PATHS:
        assert (ROOT / path).exists(), path

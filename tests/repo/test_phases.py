"""The suite's two phases (tests/conftest.py): tests that mostly wait run two at a time, the rest alone."""
from __future__ import annotations

from types import SimpleNamespace

from tests import ROOT
from tests.conftest import PURE_PATHS, runs_alone


def _item(path: str, marks=()):
    return SimpleNamespace(path=ROOT / path, config=SimpleNamespace(rootpath=ROOT),
                           get_closest_marker=lambda name: object() if name in marks else None)


def test_cpu_bound_folders_and_solo_tests_run_alone_the_rest_two_at_a_time():
    assert runs_alone(_item("tests/emulator/planner/test_planner.py"))
    assert runs_alone(_item("tests/repo/test_static_gate.py"))
    assert not runs_alone(_item("tests/router/test_router_api.py"))
    assert not runs_alone(_item("tests/loadtests/test_sweep.py"))
    assert runs_alone(_item("tests/loadtests/test_sweep.py", marks=["solo"]))


def test_every_pure_path_names_a_file_or_folder_that_exists():
    for path in PURE_PATHS:
        assert (ROOT / path).exists(), path

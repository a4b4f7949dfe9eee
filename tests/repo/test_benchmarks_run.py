"""Every benchmark starts as its docstring says to run it: the documented `.venv/bin/python benchmarks/X.py`
(or `-m benchmarks.X`) form, from the repository's root, with no PYTHONPATH, answers --help. A sibling
import that only resolves with the repository on the path fails here, not in a user's shell."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests import ROOT

RUN = re.compile(r"\.venv/bin/python (-m benchmarks\.(\w+)|benchmarks/(\w+)\.py)")


def documented_runs() -> list[tuple[str, list[str]]]:
    """(benchmark, argv prefix) for each benchmark's first documented run line."""
    runs = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        match = RUN.search(path.read_text())
        if match is None:
            continue
        argv = ["-m", f"benchmarks.{match.group(2)}"] if match.group(2) else [f"benchmarks/{match.group(3)}.py"]
        runs.append((path.stem, argv))
    return runs


RUNS = documented_runs()


def test_the_benchmarks_document_how_to_run_them():
    documented = {name for name, _ in RUNS}
    servers = {"openai_stub", "aiohttp_router"}   # started by router_peers, not by hand
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - servers
    assert scripts <= documented, f"no documented run line: {sorted(scripts - documented)}"


@pytest.mark.parametrize(("name", "argv"), RUNS, ids=[name for name, _ in RUNS])
def test_a_benchmark_starts_as_documented(name, argv):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{name}: {done.stderr.strip().splitlines()[-1:]}"
    assert "usage:" in done.stdout


def test_slo_routing_runs_as_documented():
    """Its spec comes from routing_quality, imported when it runs (not at --help)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "benchmarks/slo_routing.py", "--rates", "20", "--requests", "20",
                           "--policies", "kv_aware"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    assert "kv_aware" in done.stdout and "TTFT ok %" in done.stdout

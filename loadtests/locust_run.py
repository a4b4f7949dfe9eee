"""Runs open_loop.py in a headless Locust subprocess and follows its records file.

Locust monkeypatches the standard library with gevent on import; a subprocess keeps that away from the
sweep (its threads, subprocesses and plotting) and lets the load generator have a core of its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtests.records import RecordReader

OPEN_LOOP = Path(__file__).with_name("open_loop.py")
TRACE_USER = Path(__file__).with_name("trace_user.py")


def base_command(locustfile: Path, url: str, *, records: Path, time_scale: float, spec: str | None = None,
                 model: str | None = None, seed: int = 0, csv_prefix: Path | None = None,
                 run_time_s: float | None = None, api: str = "chat") -> list[str]:
    """A headless Locust command line for one of kvlab's locustfiles, recording raw per-request rows."""
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", url, "--only-summary",
           "--loglevel", "WARNING", "--records", str(records), "--time-scale", f"{time_scale:g}",
           "--seed", str(seed), "--itl-events", "mean", "--api", api,
           "--exit-code-on-error", "0"]   # refused requests (429/503) are data here, not a failed run
    if spec:
        cmd += ["--spec", spec]
    if model:
        cmd += ["--model", model]
    if csv_prefix is not None:
        cmd += ["--csv", str(csv_prefix)]
    if run_time_s:
        cmd += ["--run-time", f"{int(run_time_s) + 1}s"]   # a backstop: the dispatcher ends the run itself
    return cmd


def command(url: str, stages: Sequence[tuple[float, float]], *, measured_until: float, **kw) -> list[str]:
    """Open-loop stages (rate per emulated s, wall s), measured until `measured_until` wall s."""
    return base_command(OPEN_LOOP, url, **kw) + [
        "--stages", ",".join(f"{r:g}:{s:g}" for r, s in stages), "--measured-until", f"{measured_until:g}"]


def trace_command(url: str, trace: Path, *, limit: int | None, speedup: float, **kw) -> list[str]:
    return base_command(TRACE_USER, url, **kw) + [
        "--trace", str(trace), "--trace-limit", str(limit or 0), "--speedup", f"{speedup:g}"]


class LocustRun:
    def __init__(self, cmd: list[str], records: Path, log: Path):
        self.cmd = cmd
        self.records = records
        self.log = log
        self.proc: subprocess.Popen | None = None
        self._reader = RecordReader(records)

    def start(self) -> LocustRun:
        self.records.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def progress(self) -> tuple[dict, list[dict]]:
        return self._reader.read()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

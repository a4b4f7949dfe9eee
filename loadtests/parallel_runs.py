"""Independent simulator runs on the host's cores: each rate of a curve is a run of its own.

A simulator run is deterministic in its spec and rate (the workload's seed is the spec's), so running
several at once in child processes gives the same results as one after the other, in less wall time
when the host has a spare core. Children come from a fork server (a fresh process, not a fork of the
caller, which may hold threads: servers, scrapers), so they import what they run; that costs about
a second each, small against a run of thousands of requests. With one core, or one run, everything
runs here, in order.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

MAX_PROCESSES = 4   # runs hold their requests' records in memory: a few at a time


def processes(runs: int) -> int:
    """How many child processes `runs` independent runs get (1: run them here)."""
    return max(1, min(runs, os.cpu_count() or 1, MAX_PROCESSES))


def run_all(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    """fn(*args) for each args in `calls`, in order; fn must be a module-level function (it is
    named, not copied, to the children) and its arguments and results picklable."""
    workers = processes(len(calls))
    if workers == 1:
        return [fn(*args) for args in calls]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(fn, *zip(*calls, strict=True)))

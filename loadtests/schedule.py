"""Arrival schedules in the server's time, sent on the wall clock.

Rates and stage lengths are given as the server sees them: kvlab's emulated cluster runs `time_scale`
times slower than real time, so a rate of r requests per emulated second leaves the client at
r / time_scale per wall second, and think times stretch alike. For a real server time_scale is 1.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from emulator import workload
from emulator.workload import RateProfile, Request


@dataclass(frozen=True)
class Stage:
    rate: float        # requests per emulated second
    wall_s: float      # how long it lasts on the wall clock


def parse_stages(text: str) -> list[Stage]:
    """'40:30,60:30' -> two stages: 40 req/s for 30 wall seconds, then 60 req/s for 30."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        rate, _, seconds = part.partition(":")
        if not seconds:
            raise ValueError(f"stage {part!r} needs rate:wall_seconds")
        stages.append(Stage(float(rate), float(seconds)))
    if not stages:
        raise ValueError("no stages given")
    return stages


def profile_stages(rate: float, profile: str, factor: float, at: float, length: float, horizon: float) -> list[Stage]:
    """Stages of a constant rate, a step to factor x rate at `at`, or a burst of `length` at `at` (wall s)."""
    if profile == "constant":
        return [Stage(rate, horizon)]
    if profile == "step":
        return [Stage(rate, at), Stage(rate * factor, max(horizon - at, 1.0))]
    if profile == "burst":
        return [Stage(rate, at), Stage(rate * factor, length), Stage(rate, max(horizon - at - length, 1.0))]
    raise ValueError(f"unknown profile {profile!r}; use constant, step or burst")


def stage_starts(stages: list[Stage]) -> np.ndarray:
    """Wall offsets at which each stage begins, plus the end of the last."""
    return np.concatenate([[0.0], np.cumsum([s.wall_s for s in stages])])


def rate_profile(stages: list[Stage], time_scale: float) -> RateProfile:
    starts = stage_starts(stages)[:-1] / time_scale
    return RateProfile(starts=tuple(float(s) for s in starts), rates=tuple(s.rate for s in stages))


def open_loop_requests(stages: list[Stage], time_scale: float, *, mix: dict[str, float],
                       params: dict | None = None, tenants: dict[str, float] | None = None,
                       arrival: str = "poisson", cv: float = 1.0, seed: int = 0) -> list[tuple[float, Request, int]]:
    """(wall send offset, request, stage index) for every arrival of the stages, in order."""
    total_emulated = float(stage_starts(stages)[-1]) / time_scale
    requests = workload.generate(rate_profile(stages, time_scale), duration_s=total_emulated, mix=mix,
                                 params=params, tenants=tenants, arrival=arrival, cv=cv, seed=seed, with_text=True)
    starts = stage_starts(stages)
    out = []
    for r in requests:
        at = r.arrival_s * time_scale
        out.append((at, r, int(np.searchsorted(starts, at, side="right")) - 1))
    return out


def tenant_weights(spec) -> dict[str, float]:
    """The spec's tenant mix: workload.tenants, else all traffic from the first tenant, else "default"."""
    if spec is not None and spec.workload.tenants:
        return dict(spec.workload.tenants)
    if spec is not None and spec.tenants:
        return {spec.tenants[0].name: 1.0}
    return {"default": 1.0}


def spec_requests(spec, stages: list[Stage], time_scale: float, seed: int | None = None,
                  arrival: str | None = None, cv: float | None = None) -> list[tuple[float, Request, int]]:
    """open_loop_requests for a spec's workload: what open_loop.py sends with --spec (same seed, same
    requests), so the sweep can replay the identical schedule through the simulator."""
    w = spec.workload
    return open_loop_requests(stages, time_scale, mix=dict(w.mix), params=dict(w.params),
                              tenants=tenant_weights(spec), arrival=arrival or w.arrival, cv=cv or w.cv,
                              seed=w.seed if seed is None else seed)


def scheduled(items: list[tuple[float, Request, int]]) -> Iterator[tuple[float, tuple[Request, int]]]:
    """The (offset, item) pairs the dispatcher takes."""
    for at, request, stage in items:
        yield at, (request, stage)


def users_at(t: float, shape: str, base: int, factor: float, at: float, length: float) -> int:
    """The user count a closed-loop step or burst asks for `t` seconds into the test (shapes.py)."""
    raised = max(1, round(base * factor))
    if shape == "step":
        return raised if t >= at else base
    if shape == "burst":
        return raised if at <= t < at + length else base
    raise ValueError(f"unknown shape {shape!r}; use step or burst")

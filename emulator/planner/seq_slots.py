"""Waiting for a free sequence slot: the running count as a birth-death process against max_num_seqs.

Little's law gives the mean number running; its spread is wider than an infinite-server queue's
(Poisson) because every sequence slows every other: with n running, each step takes ITL(n), so the
n sequences finish at rate mu(n) = n / (E[decode steps] x ITL(n)), which flattens as n grows. The
running count is then a birth-death chain, arrivals at rate lambda and departures at mu(n):

    pi(n) ~ prod_{k <= n} lambda / mu(k)              for n <= cap (max_num_seqs)
    pi(cap + j) = pi(cap) rho^j,  rho = lambda / mu(cap)   (arrivals wait for a slot)

An arrival (PASTA) finds all slots taken with probability P = sum_{n >= cap} pi(n) and then waits,
as in M/M/1 past the cap, an exponential time of rate mu(cap) (1 - rho). The wait comes before its
prefill can be scheduled, so it adds to TTFT.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from emulator.planner import dist


def running_law(rate: float, steps: float, itl: Callable[[float], float], cap: int) -> tuple[np.ndarray, float]:
    """(pi(0..cap) unnormalised in log space made exact, rho past the cap); rho >= 1: no steady state."""
    logs = np.zeros(cap + 1)
    n = np.arange(1, cap + 1, dtype=float)
    mu = n / (steps * _itl_at(itl, cap))
    with np.errstate(divide="ignore"):
        logs[1:] = np.cumsum(np.where((mu > 0) & np.isfinite(mu), np.log(rate / mu), math.inf))
    rho = rate * steps * itl(float(cap)) / cap
    return logs, rho


def _itl_at(itl: Callable[[float], float], cap: int) -> np.ndarray:
    """ITL(1..cap): exact at every whole n up to 16, then at 5% steps, linear in between (the step
    time is smooth in the batch, and each exact value may cost a prefill profile at that batch)."""
    grid, n = [], 0
    while n < cap:
        n = min(cap, n + 1 if n < 16 else math.ceil(n * 1.05))
        grid.append(n)
    return np.interp(np.arange(1, cap + 1), grid, [itl(float(k)) for k in grid])


def wait(rate: float, steps: float, itl: Callable[[float], float], cap: int) -> dist.Points | None:
    """The slot wait an arrival sees (0 when a slot is free), or None when the slots cannot keep up."""
    if rate <= 0 or steps <= 0:
        return dist.Points.fixed(0.0)
    logs, rho = running_law(rate, steps, itl, cap)
    if rho >= 1 or not np.isfinite(logs).all():
        return None
    top = logs.max()
    below = np.exp(logs - top)
    at_cap = below[-1] / (1.0 - rho)          # pi(cap) + pi(cap + 1) + ... (geometric)
    p_wait = at_cap / (below[:-1].sum() + at_cap)
    if p_wait < 1e-9:
        return dist.Points.fixed(0.0)
    mu_cap = cap / (steps * itl(float(cap)))
    scale = 1.0 / (mu_cap * (1.0 - rho))
    edges = np.asarray(dist.LEVEL_EDGES)
    lo, hi = edges[:-1], edges[1:]
    # the exponential's mean on each quantile bin [lo, hi): scale (1 - (q ln q - r ln r) / (q - r)), with
    # q = 1 - lo, r = 1 - hi (integrate -ln v from r to q; r ln r is 0 for the last bin)
    q, r = 1 - lo, 1 - hi
    rlnr = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
    means = scale * (1 - (q * np.log(q) - rlnr) / (q - r))
    values = np.concatenate([[0.0], means])
    weights = np.concatenate([[1.0 - p_wait], p_wait * (hi - lo)])
    return dist.Points(values, weights)

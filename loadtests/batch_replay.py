"""A prefill worker's queue replayed event by event: the reference the planner's batch law
(emulator.planner.batch_queue) is checked against. Poisson arrivals of prompts drawn from given
sizes; FCFS chunked prefill, each step taking the queued tokens up to the budget and lasting step(tokens)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from emulator.planner import batch_queue, dist


def replay(rate: float, sizes: np.ndarray, weights: np.ndarray, budget: int, step: Callable[[float], float],
           n: int, seed: int) -> np.ndarray:
    """TTFT of each of n arrivals but the first 5% (they warm the queue up)."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / rate, n))
    left = rng.choice(np.asarray(sizes, float), n, p=np.asarray(weights) / np.sum(weights))
    first = np.zeros(n)
    t, head = 0.0, 0
    queue: list[int] = []
    while head < n or queue:
        if not queue:
            t = max(t, arrival[head])
        while head < n and arrival[head] <= t:
            queue.append(head)
            head += 1
        room, done = budget, []
        for j in queue:
            take = min(left[j], room)
            left[j] -= take
            room -= take
            if left[j] <= 0:
                done.append(j)
            if room <= 0:
                break
        t += step(budget - room)
        first[done] = t
        queue = [j for j in queue if left[j] > 0]
    return (first - arrival)[n // 20:]


def linear_server(sizes, weights, rate: float, a: float, b: float, budget: int):
    """(the batch law's server, own latencies, step function) of a worker whose step lasts a + b x tokens."""
    k = batch_queue.CELLS_PER_BUDGET
    cell = budget / k
    sizes, weights = np.asarray(sizes, float), np.asarray(weights, float)
    s = batch_queue.BatchServer(rate=rate, cell=cell, k=k, step=a + b * np.maximum(1, np.arange(k + 1) * cell),
                                sizes=sizes / cell, weights=weights / weights.sum(),
                                own_excess=np.zeros(len(sizes)), states=400)
    return s, dist.Points(a + b * sizes, weights), (lambda tokens: a + b * tokens)

"""Spare workers from a target availability (N+k), from a per-GPU failure rate and a repair time.

A GPU alternates between up and down: failures at rate f per hour, repairs taking R hours on average,
so it is down a share g = f R / (1 + f R) of the time (the two-state Markov chain's steady state). A
worker of tp GPUs (one TP group) is down when any of its GPUs is: u = 1 - (1 - g)^tp. Workers fail
independently, so with N + k workers the number down is Binomial(N + k, u), and a pool that needs N
serving keeps its SLOs while at most k are down. k is the smallest spare count with

    P(Binomial(N + k, u) <= k) >= target availability.

Default failure rate: the Llama 3 paper (Dubey et al., "The Llama 3 Herd of Models", 2024, section 3.3.4):
419 unexpected interruptions in 54 days of training on 16,384 H100 GPUs, i.e. 419 / (16,384 x 54 x 24)
= 1.97e-5 per GPU-hour. Every unexpected interruption is counted (GPU faults and HBM were about half,
network, host and software the rest): each one takes the worker on that GPU down. Default repair time:
a modelling choice, not a measured constant (a failed GPU or board swapped within a day); give your
fleet's own.
"""
from __future__ import annotations

import math

from emulator.planner.errors import PlannerError

GPU_FAILURES_PER_HOUR = 419 / (16_384 * 54 * 24)   # Llama 3 paper, section 3.3.4 (see above)
REPAIR_HOURS = 24.0                                 # modelling choice (see above)
MAX_SPARES = 1_000


def gpu_unavailability(failures_per_hour: float, repair_hours: float) -> float:
    """Steady-state share of time one GPU is down: f R / (1 + f R)."""
    down = failures_per_hour * repair_hours
    return down / (1.0 + down)


def worker_unavailability(tp: int, failures_per_hour: float, repair_hours: float) -> float:
    """A TP group is down when any of its GPUs is."""
    return 1.0 - (1.0 - gpu_unavailability(failures_per_hour, repair_hours)) ** tp


def spares(serving: int, tp: int, availability: float, failures_per_hour: float = GPU_FAILURES_PER_HOUR,
           repair_hours: float = REPAIR_HOURS) -> int:
    """Smallest k >= 0 with P(at most k of serving + k workers down) >= availability."""
    if not 0.0 < availability < 1.0:
        raise PlannerError(f"availability must be in (0, 1) (got {availability})")
    if serving <= 0:
        return 0
    u = worker_unavailability(tp, failures_per_hour, repair_hours)
    for k in range(MAX_SPARES + 1):
        if _at_most(k, serving + k, u) >= availability:
            return k
    raise PlannerError(f"no spare count up to {MAX_SPARES} reaches availability {availability}")


def _at_most(k: int, n: int, u: float) -> float:
    """P(Binomial(n, u) <= k), summed in log space (n may be large and u tiny)."""
    if u <= 0.0:
        return 1.0
    if u >= 1.0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(u)
            + (n - i) * math.log1p(-u) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))

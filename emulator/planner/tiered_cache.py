"""Per-tier prefix hit rates of an HBM cache backed by a host-memory tier (Che's approximation, two levels).

The engine's host tier is a victim cache: a block evicted from HBM is demoted to the host's LRU, a host
hit moves it back, and a hash is in one tier at most (workers.core.block_manager). The two tiers then
behave as one LRU stack of C_hbm + C_host blocks whose top C_hbm entries are in HBM. Che's approximation
(Che, Tung & Wang, IEEE JSAC 2002) gives each level its characteristic time: a block asked for again
within T_hbm is found in HBM, within T_both (of the C_hbm + C_host cache) in one of the tiers, so

    P(HBM hit)  = 1 - exp(-lambda T_hbm)
    P(host hit) = exp(-lambda T_hbm) - exp(-lambda T_both)

for a block asked for at rate lambda (``two_level_hits``, on the planner's prefix groups). On a trace
(``trace_tier_hits``) the same rule is applied to each block's own reuse times, the time-to-live form of
Che's approximation (Fricker, Robert & Roberts, ITC 2012): an access hits a tier when the block's last
access is less than that tier's T ago, and T is where the blocks' mean residency fills the capacity. A
prompt hits its leading blocks up to the first miss, HBM first and host after (the engine's rule).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from emulator.planner.prefix_cache import characteristic_time


def two_level_hits(sizes: np.ndarray, rates: np.ndarray, copies: float, flux: float, hbm_capacity: float,
                   host_capacity: float) -> tuple[np.ndarray, np.ndarray]:
    """Per prefix group: the chance it is found in HBM, and in host memory (the arguments as
    prefix_cache.characteristic_time takes them; capacities in tokens)."""
    t_hbm = characteristic_time(sizes, rates, copies, flux, hbm_capacity)
    t_both = characteristic_time(sizes, rates, copies, flux, hbm_capacity + host_capacity)
    in_hbm = _held(rates, t_hbm)
    return in_hbm, _held(rates, t_both) - in_hbm


def _held(rates: np.ndarray, t: float) -> np.ndarray:
    return np.ones_like(rates) if math.isinf(t) else -np.expm1(-rates * t)


@dataclass(frozen=True)
class TierHits:
    hbm: float    # hit tokens found in HBM / prompt tokens
    host: float   # hit tokens onboarded from host memory / prompt tokens

    @property
    def total(self) -> float:
        return self.hbm + self.host

    @property
    def prefill_load(self) -> float:
        """Prompt tokens prefilled with the host tier over those prefilled without it. The HBM tier's hits
        are those of the same HBM cache alone (its LRU stack is the top of the two-level one)."""
        return (1.0 - self.total) / (1.0 - self.hbm) if self.hbm < 1.0 else 1.0


class TraceRequest:
    """What the estimate reads of a request: arrival (s), prompt tokens, its full prompt blocks' hashes,
    and the blocks it caches that nobody asks for again (its output's)."""
    __slots__ = ("arrival", "prompt_len", "hashes", "own_blocks")

    def __init__(self, arrival: float, prompt_len: int, hashes: Sequence[int], own_blocks: int):
        self.arrival, self.prompt_len, self.hashes, self.own_blocks = arrival, prompt_len, hashes, own_blocks


def trace_tier_hits(requests: Iterable[TraceRequest], block_size: int, hbm_blocks: int,
                    host_blocks: int) -> TierHits:
    """Per-tier hit rates of a request stream through one HBM cache of `hbm_blocks` and its host tier."""
    reqs = sorted(requests, key=lambda r: r.arrival)
    gaps, residencies = _reuse(reqs)
    span = reqs[-1].arrival - reqs[0].arrival if reqs else 0.0
    t_hbm = _ttl(residencies, hbm_blocks, span)
    t_both = _ttl(residencies, hbm_blocks + host_blocks, span)
    prompt = hbm = host = 0
    for req, req_gaps in zip(reqs, gaps, strict=True):
        prompt += req.prompt_len
        usable = req_gaps[:max(0, (req.prompt_len - 1) // block_size)]
        in_hbm = _leading(usable, t_hbm)
        hbm += in_hbm
        host += _leading(usable[in_hbm:], t_both)
    scale = block_size / prompt if prompt else 0.0
    return TierHits(hbm=hbm * scale, host=host * scale)


def _leading(gaps: np.ndarray, t: float) -> int:
    misses = np.flatnonzero(gaps >= t)
    return int(misses[0]) if len(misses) else len(gaps)


def _reuse(reqs: list[TraceRequest]) -> tuple[list[np.ndarray], np.ndarray]:
    """Each request's blocks' times since their last access (inf: first access), and every access's time
    until the next one (to the end of the stream for the last, and for blocks nobody asks for again)."""
    end = reqs[-1].arrival if reqs else 0.0
    last: dict[int, int] = {}         # block hash -> index of its latest access in `times`
    times: list[float] = []
    until_next: list[float] = []
    gaps = []
    for req in reqs:
        t = req.arrival
        g = np.full(len(req.hashes), np.inf)
        for i, h in enumerate(req.hashes):
            j = last.get(h)
            if j is not None:
                g[i] = t - times[j]
                until_next[j] = t - times[j]
            last[h] = len(times)
            times.append(t)
            until_next.append(end - t)
        until_next.extend([end - t] * req.own_blocks)
        times.extend([t] * req.own_blocks)
        gaps.append(g)
    return gaps, np.asarray(until_next)


def _ttl(residencies: np.ndarray, capacity: float, span: float) -> float:
    """T at which blocks, each kept T after its access unless asked for again sooner, fill `capacity` on
    average over the stream's `span` seconds (inf when even keeping everything does not)."""
    if span <= 0 or residencies.sum() <= capacity * span:
        return math.inf
    lo, hi = 0.0, span
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.minimum(residencies, mid).sum() < capacity * span else (lo, mid)
    return lo


def spec_trace_tier_hits(spec, trace, limit: int | None = None, speedup: float = 1.0) -> TierHits:
    """The estimate for a cluster spec replaying a trace: its prompt-computing workers' HBM pools and host
    tiers taken as one pooled cache each (what cache-affine routing approaches), outputs' blocks as flux."""
    from emulator import traces
    from emulator.physics import roofline

    bs = spec.engine.block_size
    pools = [p for p in spec.pools if p.role != "decode"]
    hbm = sum(spec.kv_blocks(p) * p.count for p in pools)
    host = sum(int(spec.engine.host_kv_gb * 1e9 // (bs * roofline.kv_bytes_per_token_per_gpu(spec.deployment(p))
                                                    * spec.deployment(p).tp)) * p.count for p in pools)
    reqs = [TraceRequest(r.arrival_s, r.prompt_len, r.block_hashes,
                         (r.prompt_len + r.max_tokens) // bs - r.prompt_len // bs)
            for r in traces.hashed_requests(trace, speedup=speedup, limit=limit, block_size=bs)]
    return trace_tier_hits(reqs, bs, hbm, host)

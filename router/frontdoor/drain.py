"""The drain rate the shedder needs: how fast one prefill-capable worker empties its queue.

From the roofline on the spec's own deployment and workload (the same physics the workers run):
  S      a request's mean prefill on an idle worker: each sampled request's new tokens (prompt less
         the shared prefix that prefix-aware routing keeps cached), chunked by the step budget, one
         step per chunk, averaged over the samples (long prompts cost more than their share);
  1/mu   the worker time per request once a backlog packs every step full: a budget-filled step of
         such requests (each its own sequence), times the request's share of that step's tokens; and,
         on a colocated worker, at least a sequence slot's turnover: a request holds one of the
         max_num_seqs slots for its prefill and all its decode steps (a full batch's step each), so a
         waiting request starts no faster than lifetime / max_num_seqs apart.
  cv     the spread (std / mean) of one request's share of 1/mu: of its new tokens under packed
         steps, of its lifetime when slots bind (n slots whose lifetimes vary release like one renewal
         process of that spread, mean gap lifetime / n). The shedder sizes the queue for the p99 wait
         with it (router.frontdoor.gate.DrainLimit).
  places the line one worker may hold: the largest k whose p99 wait (k requests' shares of 1/mu, their
         new tokens or lifetimes as sampled, plus the request's own prefill) meets the TTFT SLO.
The drain figure takes the mean request; the planner (emulator.planner) does the full laws.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from emulator import workload
from emulator.physics import roofline
from emulator.spec import ClusterSpec

SAMPLES = 1000   # generated requests whose mean lengths set the figures
FEW_SLOTS = 8      # up to this many sequence slots release in step with their lifetimes
MAX_PLACES = 4096  # a longer line per worker than any SLO allows on a real engine


class Drain(NamedTuple):
    prefill_s: float     # S: a request's mean prefill on an idle worker
    drain_s: float       # 1/mu: mean worker time per request under a backlog
    places: int          # places in one worker's line whose p99 TTFT meets the SLO


def prefill_times(spec: ClusterSpec, samples: int = SAMPLES) -> Drain:
    """S and 1/mu (emulated seconds) and the p99-sized line, for one worker of the first prefill-capable pool."""
    pool = next(p for p in spec.pools if p.role != "decode")
    dep = spec.deployment(pool)
    requests = workload.from_spec(spec, 1.0, num_requests=samples)
    prompt = np.asarray([r.prompt_len for r in requests], dtype=float)
    shared = np.asarray([min(r.shared_tokens or 0, r.prompt_len - 1) for r in requests], dtype=float)
    block = spec.engine.block_size
    hits = np.floor(shared / block) * block
    budget = spec.engine.max_num_batched_tokens
    alone = np.asarray([prefill_alone(dep, int(p - h), int(h), budget) for p, h in zip(prompt, hits, strict=True)])
    new, cached = max(1, int(round(float(np.mean(prompt - hits))))), int(np.mean(hits))
    piece = min(budget, new)
    full = roofline.BatchShape()
    for _ in range(max(1, budget // piece)):
        full.add(piece, cached)
    per_token = roofline.step_time(dep, full).seconds / full.new_tokens
    shares = per_token * (prompt - hits)         # packed steps: a request's share follows its new tokens
    if pool.role == "both":
        output = np.asarray([r.max_tokens for r in requests], dtype=float)
        seqs = spec.engine.max_num_seqs
        step = full_batch_step(dep, float(np.mean(prompt)), float(np.mean(output)), seqs)
        turnover = (alone + output * step) / seqs
        if np.mean(turnover) > per_token * new:  # slots bind: a request starts when a slot frees
            shares = release_gaps(turnover, seqs)
    return Drain(float(np.mean(alone)), float(np.mean(shares)), p99_places(spec.slo.ttft_p99_s, shares, alone))


def release_gaps(turnover: np.ndarray, seqs: int) -> np.ndarray:
    """Gaps between slot releases, mean lifetime / seqs. Few slots release in step with their
    lifetimes (a renewal process of their spread); among many, the next few releases come from
    different slots at random points of their lives: a Poisson stream (Palm-Khintchine), exponential gaps."""
    if seqs <= FEW_SLOTS:
        return turnover
    return float(np.mean(turnover)) * np.random.default_rng(1).exponential(1.0, turnover.size)


def p99_places(slo_s: float, shares: np.ndarray, prefill: np.ndarray, draws: int = 4000) -> int:
    """The most places k in a worker's line whose p99 TTFT, k shares of 1/mu plus the request's own
    prefill, stays within the SLO. The SLO is a p99 and the requests ahead vary: the mean rule
    k <= (SLO - S) mu would put the last admitted request at the SLO on average, half of them over.
    The sum's quantile is sampled (fixed seed: the same figure every start)."""
    mean_share = float(np.mean(shares))
    if mean_share <= 0:
        return 0
    most = int(min(MAX_PLACES, max(0.0, (slo_s - float(np.mean(prefill))) / mean_share)))   # the mean rule
    if most == 0:
        return 0
    rng = np.random.default_rng(0)
    waits = np.cumsum(rng.choice(shares, (draws, most)), axis=1) + rng.choice(prefill, (draws, 1))
    fits = np.quantile(waits, 0.99, axis=0) <= slo_s
    return int(np.count_nonzero(fits))   # cumulative sums: the p99 grows with k, so the fits are a prefix


def slot_turnover(dep: roofline.Deployment, prefill_s: float, prompt: float, output: float, seqs: int) -> float:
    """Seconds between slot releases on a worker whose max_num_seqs slots are all held: one request's
    lifetime (its prefill, then its output in decode steps of a full batch at the mean context) / seqs."""
    return (prefill_s + output * full_batch_step(dep, prompt, output, seqs)) / seqs


def full_batch_step(dep: roofline.Deployment, prompt: float, output: float, seqs: int) -> float:
    """A decode step of `seqs` sequences at the mean context (halfway through the output)."""
    batch = roofline.BatchShape()
    for _ in range(seqs):
        batch.add(1, int(prompt + output / 2))
    return roofline.step_time(dep, batch).seconds


def prefill_alone(dep: roofline.Deployment, new: int, cached: int, budget: int) -> float:
    """One prompt's prefill on an idle worker: its new tokens in budget-sized chunks, a step each."""
    seconds, done = 0.0, 0
    while done < new:
        chunk = min(budget, new - done)
        seconds += roofline.step_time(dep, roofline.BatchShape().add(chunk, cached + done)).seconds
        done += chunk
    return seconds

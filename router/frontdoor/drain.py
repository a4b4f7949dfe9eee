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
The drain figure takes the mean request; the planner (emulator.planner) does the full laws.
"""
from __future__ import annotations

import numpy as np

from emulator import workload
from emulator.physics import roofline
from emulator.spec import ClusterSpec

SAMPLES = 1000   # generated requests whose mean lengths set the figures


def prefill_times(spec: ClusterSpec, samples: int = SAMPLES) -> tuple[float, float]:
    """(S, 1/mu) in emulated seconds for one worker of the spec's first prefill-capable pool."""
    pool = next(p for p in spec.pools if p.role != "decode")
    dep = spec.deployment(pool)
    requests = workload.from_spec(spec, 1.0, num_requests=samples)
    prompt = np.asarray([r.prompt_len for r in requests], dtype=float)
    shared = np.asarray([min(r.shared_tokens or 0, r.prompt_len - 1) for r in requests], dtype=float)
    block = spec.engine.block_size
    hits = np.floor(shared / block) * block
    budget = spec.engine.max_num_batched_tokens
    alone = float(np.mean([prefill_alone(dep, int(p - h), int(h), budget) for p, h in zip(prompt, hits, strict=True)]))
    new, cached = max(1, int(round(float(np.mean(prompt - hits))))), int(np.mean(hits))
    piece = min(budget, new)
    full = roofline.BatchShape()
    for _ in range(max(1, budget // piece)):
        full.add(piece, cached)
    per_request = roofline.step_time(dep, full).seconds * new / full.new_tokens
    if pool.role == "both":
        output = float(np.mean([r.max_tokens for r in requests]))
        per_request = max(per_request, slot_turnover(dep, alone, float(np.mean(prompt)), output,
                                                     spec.engine.max_num_seqs))
    return alone, per_request


def slot_turnover(dep: roofline.Deployment, prefill_s: float, prompt: float, output: float, seqs: int) -> float:
    """Seconds between slot releases on a worker whose max_num_seqs slots are all held: one request's
    lifetime (its prefill, then its output in decode steps of a full batch at the mean context) / seqs."""
    batch = roofline.BatchShape()
    for _ in range(seqs):
        batch.add(1, int(prompt + output / 2))
    return (prefill_s + output * roofline.step_time(dep, batch).seconds) / seqs


def prefill_alone(dep: roofline.Deployment, new: int, cached: int, budget: int) -> float:
    """One prompt's prefill on an idle worker: its new tokens in budget-sized chunks, a step each."""
    seconds, done = 0.0, 0
    while done < new:
        chunk = min(budget, new - done)
        seconds += roofline.step_time(dep, roofline.BatchShape().add(chunk, cached + done)).seconds
        done += chunk
    return seconds

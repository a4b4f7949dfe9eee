"""Conditional disaggregation: which requests a disaggregated cluster prefills on their decode worker.

pd_pair (router.policies.pd_pair) picks the decode worker first; when fewer than
`local_prefill_tokens` of the prompt are uncached there, it sends no prefill worker and the decode
worker runs the prompt itself. On that worker (workers.core.scheduler) the request is an ordinary
arrival: it waits FCFS for a sequence slot and the step budget the running decodes leave, is
prefilled in chunks in steps that also carry every running decode, and its first token comes out of
its last chunk's step. So a decode worker is a colocated worker (`colocated`, the same laws) whose
steps prefill only the local share's prompts while every arrival decodes there; the remote share
loads the prefill pool and the KV link as without conditional disaggregation.

A request is local when its uncached tokens are below the limit. Uncached means on the decode
worker; its prefix hit is taken as the prefill pool's (as `decode.transfer_times` does), and with
prefix groups a sample's hit is its expected one (exact where the LRU keeps its prefix or drops it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from emulator.planner import colocated, context, decode, dist, queueing
from emulator.planner.context import Context


@dataclass(frozen=True)
class Split:
    local: float          # share of arrivals prefilled on their decode worker
    local_ctx: Context    # their prompt points (and cached tokens)
    remote_ctx: Context   # the others', prefilled on the prefill pool (the whole mix if none is remote)


def split(ctx: Context) -> Split | None:
    """The local and remote classes, or None when every prompt goes to the prefill pool."""
    limit = ctx.req.local_prefill_tokens
    if ctx.mode != "disaggregated" or limit <= 0:
        return None
    if "split" not in ctx.memo:
        local, remote = _classes(ctx, limit)
        share = float(local[2].sum()) if local is not None else 0.0
        ctx.memo["split"] = None if local is None else Split(
            local=share, local_ctx=_sub(ctx, *local), remote_ctx=_sub(ctx, *remote) if remote is not None else ctx)
    return ctx.memo["split"]


Class = tuple[np.ndarray, np.ndarray, np.ndarray]   # prompt tokens, cached tokens, share of all requests


def _classes(ctx: Context, limit: int) -> tuple[Class | None, Class | None]:
    """(local, remote) prompt points. From the samples where the context has them: a prompt point
    binned by new tokens may straddle the limit (disagg-70b-h100: one point of 10% with 433 new tokens
    on average holds 80.5% local samples), so each class's samples are binned on a quantile grid of
    their own (`_binned`)."""
    if ctx.sample_hits is None:
        local = ctx.new_tokens < limit
        return (_points(ctx.prompts.values[local], ctx.cached[local], ctx.prompts.weights[local]),
                _points(ctx.prompts.values[~local], ctx.cached[~local], ctx.prompts.weights[~local]))
    x, hits, weights = context.hit_or_miss(np.asarray(ctx.workload.prompt.samples, dtype=float), ctx.sample_hits,
                                           ctx.sample_held)
    local = x - hits < limit
    return _binned(x, hits, weights, local), _binned(x, hits, weights, ~local)


def _binned(x: np.ndarray, hits: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> Class | None:
    """The (prompt, hit, weight) entries in `mask` binned by their new tokens on a quantile grid of their
    own (fine in the class's tail, as the whole mix's points are in its tail): each bin's mean prompt and
    hit, weighted by the class's share of all requests.

    Not the whole mix's points cut at the limit: the local class then kept the mix's coarse body bins,
    and its top point (disagg draw, 70B H100 TP8, limit 512) stood for every local prompt from 400 to
    511 new tokens at 458. A step's time is not linear in its tokens (the H100 layer profile jumps by
    a third between 508 and 518 tokens in the step), so the 4% of local prompts that with the running
    decodes pass that jump made 46 ms steps in the engine and none in the plan: the ITL tail
    (p99 crossing) came out late."""
    if not mask.any():
        return None
    points, cached = context.entry_points(x[mask], hits[mask], weights[mask])
    return _points(points.values, cached, points.weights * float(weights[mask].sum()))


def _points(prompts: np.ndarray, cached: np.ndarray, weights: np.ndarray) -> Class | None:
    return (prompts, cached, weights) if len(prompts) and weights.sum() > 0 else None


def _sub(ctx: Context, prompts: np.ndarray, cached: np.ndarray, weights: np.ndarray) -> Context:
    """The context of one class's prompts. Its decodes stay the whole mix's (every request decodes on
    the decode pool), so the decode profile (and with it every step's decode part) is the parent's."""
    return dataclasses.replace(ctx, prompts=dist.Points(prompts, weights), cached=cached,
                               memo={"decode_profile": decode.profile(ctx), **decode.carried(ctx)}, sample_point=None,
                               sample_hits=None, sample_held=None)


@dataclass(frozen=True)
class DecodeWorker:
    point: colocated.ColocatedPoint   # every arrival's decodes, the local share's prefills
    pool: decode.DecodePool           # the same worker as the KV handoff sees it (the remote share's link)
    slot_wait: dist.Points | None     # an arrival's wait for a sequence slot (None: the slots cannot keep up)


def decode_worker(ctx: Context, sp: Split, rate: float, workers: int) -> DecodeWorker:
    """One of `workers` decode workers at pool rate `rate`: the colocated laws with the local share's
    prefills; the KV-import link (an M/G/1 queue, as in `decode.disaggregated`) carries the remote share's."""
    prefills = colocated.Prefills(sp.local_ctx, sp.local)
    p = colocated.evaluate(ctx, rate, workers, prefills)
    per_worker = rate / workers
    remote_rate = per_worker * (1.0 - sp.local)
    transfers = decode.transfer_times(sp.remote_ctx)
    rho = remote_rate * transfers.mean()
    link_wait = queueing.pk_wait(remote_rate, transfers.mean(), transfers.moment2()) if rho < 1 else math.inf
    pool = decode.DecodePool(rate=per_worker, batch=p.batch, itl_mean=p.itl_mean, stable=p.stable and rho < 1,
                             bound=decode.step(ctx, max(1, round(1 + p.batch))).bound, link_rho=rho,
                             link_wait=link_wait, transfers=transfers, running=p.running)
    slots = colocated.slot_wait(ctx, rate, workers, prefills) if p.stable else None
    return DecodeWorker(point=p, pool=pool, slot_wait=slots)


def gaps(ctx: Context, sp: Split, dw: DecodeWorker) -> dist.Points:
    """Inter-token gaps on a decode worker: decode-only and mixed steps (`colocated.gaps`), and, unless
    the handoff is in TTFT, the remote share's first gaps, which carry the KV import (`decode.first_gap`)."""
    steady = colocated.gaps(ctx, dw.point)
    if ctx.req.first_token_after_transfer or ctx.decode_tokens <= 0 or sp.local >= 1.0:
        return steady
    share = (1.0 - sp.local) * decode.first_gap_share(ctx)
    return dist.mixture([(1.0 - share, steady), (share, decode.first_gap(ctx, dw.pool))])


def note(ctx: Context) -> list[str]:
    """What the plan says about the split, at the context's own prefix hits."""
    sp = split(ctx)
    if sp is None or sp.local <= 0:
        return []
    return [f"conditional disaggregation: {sp.local:.0%} of requests have fewer than "
            f"{ctx.req.local_prefill_tokens} uncached prompt tokens, so the router prefills them on their decode "
            "worker: their prefills are costed in the decode workers' mixed steps (ITL) and their TTFT is the "
            "decode worker's queue and steps; only the others load the prefill pool and the KV link"]

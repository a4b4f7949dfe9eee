"""Fast-forward of a steady decode batch, for discrete-event drivers.

When every running request is decoding and nothing else is queued, the next k steps are fully
determined: each request gains one token per step, step j reads j more tokens of KV per request,
and the durations come from steptime.decode_run_times (equal to step_time step by step). This
advances them in one call, with per-token times, and leaves the step that finishes a request, and
anything irregular (waiting requests, transfers, held KV, EOS draws, a pool too full to grow
without preemption), to the ordinary step.
"""
from __future__ import annotations

import numpy as np

from emulator.physics import roofline, steptime
from workers.core import output
from workers.core.block_manager import cache_computed_blocks


def fast_forward(engine, now: float, until: float):
    """A merged StepResult for the steps starting before `until`, or None when not applicable."""
    sched = engine.scheduler
    running = sched.running
    if not _steady(engine):
        return None
    cap = min(_steps_left(engine, req) for req in running) - 1  # the finishing step goes the normal way
    if cap < 2:
        return None
    batch = len(running)
    times = steptime.decode_run_times(engine.dep, batch, sum(r.num_computed for r in running), cap)
    ends = now + np.cumsum(times)
    steps = min(cap, 1 + int(np.searchsorted(ends[:-1], until, side="left")))
    if steps < 2 or not _grow_all(engine, steps):
        return None
    context_sum = sum(r.num_computed for r in running)
    result = _advance(engine, now, ends[:steps], steps)
    if engine.count_traffic:
        result.flops, result.hbm_bytes = roofline.step_traffic(engine.dep, _run_shape(batch, context_sum, steps),
                                                               steps)
    return result


def _run_shape(batch: int, context_sum: int, steps: int) -> roofline.BatchShape:
    """The summed shape of `steps` decode steps of `batch` sequences, step j reading context_sum + j x batch
    cached tokens (what BatchShape.add over every sequence and step would give)."""
    contexts = steps * context_sum + batch * steps * (steps - 1) // 2
    return roofline.BatchShape(new_tokens=batch * steps, context_tokens=contexts,
                               attention_pairs=contexts + batch * steps, sampled=batch * steps)


def _steady(engine) -> bool:
    sched = engine.scheduler
    if sched.waiting or sched.receiving or engine.held or not sched.running:
        return False
    if len(sched.running) > sched.config.max_num_batched_tokens:
        return False
    return all(r.num_computed == len(r.tokens) - 1 and not r.params.eos_probability for r in sched.running)


def _steps_left(engine, req) -> int:
    return min(req.params.max_tokens - req.num_output, engine.max_model_len - len(req.tokens))


def _grow_all(engine, steps: int) -> bool:
    """Blocks for `steps` more tokens of KV per request, all or nothing (no preemption here)."""
    bs = engine.blocks.block_size
    needs = [max(0, -(-(r.num_computed + steps) // bs) - len(r.block_ids)) for r in engine.scheduler.running]
    if sum(needs) > engine.blocks.num_free:
        return False
    for req, need in zip(engine.scheduler.running, needs, strict=True):
        if need:
            req.block_ids.extend(engine.blocks.allocate(need))
    return True


def _advance(engine, now: float, ends: np.ndarray, steps: int):
    from workers.core.engine import StepResult  # engine imports this module
    times = ends.tolist()
    tokens, token_times = [], []
    for req in engine.scheduler.running:
        prev, position = req.tokens[-1], len(req.tokens)
        for j in range(steps):
            prev = output.next_token(prev, position + j)
            req.tokens.append(prev)
            tokens.append((req.request_id, prev))
        token_times.extend(times)
        req.num_computed += steps
        if engine.config.enable_prefix_caching:
            cache_computed_blocks(engine.blocks, req)
    duration = times[-1] - now
    return StepResult(start=now, duration=duration, bound="memory" if duration else "", tokens=tokens,
                      token_times=token_times, finished=[], events=engine.blocks.take_events(),
                      decode_tokens=len(tokens), decode_s=duration, steps=steps, decode_steps=steps)

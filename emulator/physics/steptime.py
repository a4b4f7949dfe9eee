"""The step-time seam: the one place the engine, the simulator and the planner ask how long a step of
a given shape takes on a deployment.

A ``StepModel`` answers ``step_time(shape)`` and ``decode_run_times(batch, context_sum, steps)``.
``model_for(dep)`` picks the implementation from the catalog entries inside the deployment:

- ``OperatorModel`` (emulator.physics.operators): per-operator roofline with the GPU's coefficients;
- ``ProfiledModel`` (emulator.physics.profiled): the same, with a layer's GEMM + elementwise time corrected
  from a measured table, when the GPU entry carries a LayerProfile for this model and TP degree.

``host_onboard_time`` and ``host_hit_credit`` price a host-memory KV tier's hits on the same model:
the copy back over the host link, and what that saves against recomputing the prefill.

A calibrated catalog (``kvlab calibrate``) changes the GPU/link entries, so every caller that builds its
Deployment from that catalog (worker, simulator, planner) gets the same new step times.
"""
from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

from emulator.physics import roofline
from emulator.physics.catalog import Link
from emulator.physics.deployment import BatchShape, Deployment, StepTime
from emulator.physics.operators import OperatorModel
from emulator.physics.profiled import ProfiledModel


class StepModel(Protocol):
    def step_time(self, shape: BatchShape) -> StepTime: ...

    def decode_run_times(self, batch: int, context_sum: int, steps: int) -> np.ndarray: ...


def build_model(dep: Deployment) -> OperatorModel:
    """A fresh step model for `dep` (fitting builds many; everyone else uses the cached model_for): the
    operator model, or its subclass that reads a profiled GPU's layer times."""
    profile = dep.gpu.profile_for(dep.model.name, dep.tp)
    return ProfiledModel(dep, profile) if profile is not None else OperatorModel(dep)


@functools.lru_cache(maxsize=64)
def model_for(dep: Deployment) -> StepModel:
    return build_model(dep)


def step_time(dep: Deployment, shape: BatchShape) -> StepTime:
    """Duration of one engine step on one TP group."""
    return model_for(dep).step_time(shape)


def decode_run_times(dep: Deployment, batch: int, context_sum: int, steps: int) -> np.ndarray:
    """Durations of `steps` back-to-back decode steps of a fixed batch whose contexts all grow by one
    token per step (step j reads context_sum + j x batch cached tokens); equal to step_time per step,
    vectorized for drivers that fast-forward a steady decode batch."""
    return model_for(dep).decode_run_times(batch, context_sum, steps)


def host_onboard_time(dep: Deployment, tokens: int, link: Link) -> float:
    """Copying `tokens` of KV from host memory back to HBM: each GPU of the TP group moves its own shard
    over its own host link, in parallel.

    It is not added to any step: the load overlaps compute. vLLM's offloading connector loads
    asynchronously (its scheduler's ``get_num_new_matched_tokens`` answers ``load_async=True``, so the
    request waits outside the batch in WAITING_FOR_REMOTE_KVS while its blocks are copied, and the batch
    keeps running); only the loading request's prefill starts later. Loads share the link, one at a time.
    """
    return roofline.kv_transfer_time(tokens * roofline.kv_bytes_per_token_per_gpu(dep), link)


def host_hit_credit(dep: Deployment, link: Link, chunk_tokens: int = 8192) -> float:
    """What a prompt block found in host memory is worth for routing, on a scale where a block in HBM is
    worth 1 and a block found nowhere 0: one minus the time to onboard it over the time to recompute it,
    per token. Recomputing is priced as a prefill chunk of `chunk_tokens` (the scheduler's token budget)
    with no context before it, a lower bound for blocks deep in a prompt, so the credit leans low."""
    recompute = step_time(dep, BatchShape().add(chunk_tokens, 0)).seconds
    return max(0.0, 1.0 - host_onboard_time(dep, chunk_tokens, link) / recompute)

"""Everything about a plan that does not depend on the rate: the deployment, its KV pool, the
length distributions turned into per-request token counts. Built once, reused at every rate."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from emulator.engine_config import EngineConfig
from emulator.physics import roofline
from emulator.physics.catalog import Catalog, Link, builtin_catalog
from emulator.physics.deployment import deployment
from emulator.planner import dist
from emulator.planner.errors import PlannerError
from emulator.planner.inputs import PlanRequest, Workload


@dataclass
class Context:
    req: PlanRequest
    workload: Workload
    dep: roofline.Deployment
    kv_link: Link | None
    limits: EngineConfig
    prompts: dist.Points           # prompt tokens per request point
    cached: np.ndarray             # prompt tokens served from the prefix cache, per prompt point
    outputs: dist.Points           # output tokens (first included)
    pool_tokens: int               # KV pool of one worker, tokens
    memo: dict = field(default_factory=dict)  # rate-independent results keyed by name and arguments
    sample_point: np.ndarray | None = None    # which prompt point each prompt sample is binned into
    sample_hits: np.ndarray | None = None     # each prompt sample's cached tokens when its prefix is held
    sample_held: np.ndarray | None = None     # the chance each sample finds its prefix held (None: always)

    @property
    def ca2(self) -> float:
        return self.workload.burstiness ** 2

    @property
    def new_tokens(self) -> np.ndarray:
        return self.prompts.values - self.cached

    @property
    def decode_tokens(self) -> float:
        """Tokens each request leaves to decode steps: all but the first (made by the prefill step)."""
        return self.outputs.mean() - 1.0

    @property
    def mode(self) -> str:
        return self.req.mode


def build(req: PlanRequest, workload: Workload, catalog: Catalog | None = None) -> Context:
    cat = catalog or builtin_catalog()
    try:
        dep = deployment(cat, req.model, req.gpu, req.tp, req.tp_link, req.weight_dtype, req.kv_dtype)
        kv_link = cat.link(req.kv_link) if req.mode == "disaggregated" else None
    except ValueError as exc:   # an unknown name (CatalogError) or a deployment that cannot be
        raise PlannerError(str(exc)) from None
    limits = req.engine
    prompts, outputs = workload.prompt.points(), workload.output.points()
    prompts = dist.Points(np.round(prompts.values), prompts.weights)
    outputs = dist.Points(np.round(outputs.values), outputs.weights)
    pool = _check_fit(dep, limits, prompts, outputs)
    index = hits = None
    if workload.shared is not None and workload.prompt.max is None:
        prompts, cached, index, hits = _joint_points(workload.prompt.samples, workload.shared, limits.block_size)
    else:
        cached = _cached_tokens(prompts.values, workload.prefix_reuse, limits.block_size)
    return Context(req=req, workload=workload, dep=dep, kv_link=kv_link, limits=limits, prompts=prompts,
                   cached=cached, outputs=outputs, pool_tokens=pool, sample_point=index, sample_hits=hits)


def _cached_tokens(prompts: np.ndarray, reuse: float, block: int) -> np.ndarray:
    """Whole blocks only, and never the last prompt token (it must run to give logits), as in vLLM."""
    hit = np.minimum(reuse * prompts, prompts - 1)
    return np.floor(hit / block) * block


def _joint_points(samples, shared, block: int) -> tuple[dist.Points, np.ndarray, np.ndarray, np.ndarray]:
    """Prompt points binned by each sample's new tokens (prompt less its hit), each with the mean
    prompt and mean hit of its samples. Binning by prompt length and averaging the hits instead
    mixes, in one bin, prompts that are nearly all cached (a RAG document) with prompts that are
    nearly all new (a code context): new tokens, which set prefill time, lose their tail (a
    chat/code/RAG mix: p99 4,185 new tokens instead of 7,375) and so does TTFT."""
    x = np.asarray(samples, dtype=float)
    hits = sample_hits(x, shared, block)
    index = dist.point_of_each(x - hits)
    counts = np.bincount(index).astype(float)
    prompts = dist.Points(np.round(np.bincount(index, weights=x) / counts), counts / len(x))
    return prompts, per_point(index, hits, prompts), index, hits


def sample_hits(prompts: np.ndarray, shared, block: int) -> np.ndarray:
    """Each sample's shared prefix as a hit: whole blocks, never its last token (as in vLLM)."""
    return np.floor(np.minimum(np.asarray(shared, dtype=float), prompts - 1) / block) * block


def fine_new_tokens(ctx: Context) -> dist.Points | None:
    """The new tokens of the context's prompt samples binned on the tail-refined grid (dist.TAIL_EDGES),
    as they arrive (held prefixes hit, evicted ones miss); None where the context keeps no samples
    (summary lengths, or one class's points of a mix)."""
    if ctx.sample_hits is None:
        return None
    found = ctx.memo.get("fine_new_tokens")
    if found is None:
        x, hits, weights = hit_or_miss(np.asarray(ctx.workload.prompt.samples, dtype=float), ctx.sample_hits,
                                       ctx.sample_held)
        mass, (new,) = dist.weighted_bins(x - hits, weights, x - hits, edges=dist.TAIL_EDGES)
        found = ctx.memo["fine_new_tokens"] = dist.Points(new, mass)
    return found


def hit_or_miss(prompts: np.ndarray, hits: np.ndarray, held: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Each prompt sample as it arrives: (prompt, cached tokens, weight) entries, a sample whose prefix is
    held with probability h < 1 standing as two, all of `hits` with weight h and none with 1 - h (an
    LRU keeps a prefix's blocks or has evicted them). Weights sum to 1."""
    n = len(prompts)
    if held is None:
        return prompts, hits, np.full(n, 1.0 / n)
    found = np.where(hits > 0, held, 1.0)   # a sample with nothing cached to find finds all of it
    both = (found > 0) & (found < 1)
    return (np.concatenate([prompts, prompts[both]]),
            np.concatenate([np.where(found > 0, hits, 0.0), np.zeros(int(both.sum()))]),
            np.concatenate([np.where(both, found, 1.0), 1.0 - found[both]]) / n)


def entry_points(prompts: np.ndarray, hits: np.ndarray, weights: np.ndarray) -> tuple[dist.Points, np.ndarray]:
    """Weighted (prompt, cached) entries as prompt points binned by new tokens, and each point's cached
    tokens (whole tokens, never the last)."""
    mass, (mean_prompt, mean_hit) = dist.weighted_bins(prompts - hits, weights, prompts, hits)
    points = dist.Points(np.round(mean_prompt), mass)
    return points, np.minimum(np.round(mean_hit), points.values - 1)


def per_point(index: np.ndarray, tokens: np.ndarray, prompts: dist.Points) -> np.ndarray:
    """Cached tokens per prompt point: the mean of `tokens` over the samples binned into it (`index`)."""
    counts = np.bincount(index, minlength=len(prompts.values)).astype(float)
    if len(counts) != len(prompts.values):
        raise PlannerError("internal: prompt points and their cached tokens disagree")
    cached = np.bincount(index, weights=np.asarray(tokens, dtype=float), minlength=len(counts)) / np.maximum(counts, 1)
    return np.minimum(np.round(cached), prompts.values - 1)


def _check_fit(dep: roofline.Deployment, limits: EngineConfig, prompts: dist.Points, outputs: dist.Points) -> int:
    where = f"{dep.model.name} ({dep.weight_dtype}) on {dep.tp} x {dep.gpu.name}"
    pool_bytes = roofline.kv_pool_bytes_per_gpu(dep, limits.gpu_memory_utilization, limits.activation_reserve_gb)
    if pool_bytes <= 0:
        weights = roofline.weight_bytes_per_gpu(dep) / 1e9
        budget = dep.gpu.hbm_gb * limits.gpu_memory_utilization - limits.activation_reserve_gb
        raise PlannerError(f"{where} does not fit: the weights need {weights:.1f} GB per GPU but only "
                           f"{budget:.1f} GB is usable; raise tp, use fp8 weights or a larger GPU")
    # the engine allocates whole blocks: a partial block at the end of the pool holds nothing
    tokens = roofline.kv_capacity_tokens(dep, limits.gpu_memory_utilization, limits.activation_reserve_gb)
    pool = tokens // limits.block_size * limits.block_size
    longest = int(prompts.values.max() + outputs.values.max())
    if longest > dep.model.max_context:
        raise PlannerError(f"the longest requests ({longest} tokens) exceed {dep.model.name}'s context "
                           f"of {dep.model.max_context} tokens")
    if math.ceil(longest / limits.block_size) * limits.block_size > pool:
        raise PlannerError(f"{where} leaves KV room for {pool} tokens per worker, less than the longest "
                           f"requests need ({longest} tokens); raise tp or shorten the requests")
    return pool

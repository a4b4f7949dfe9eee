"""What a step time is asked about: a deployment (model on a TP group of GPUs) and a batch shape.

Plain data shared by the step-time seam (emulator.physics.steptime), its implementations and their callers.
"""
from __future__ import annotations

from collections.abc import Iterable

import msgspec

from emulator.physics.catalog import DTYPE_BYTES, Catalog, Gpu, Link, Model


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """A model served on one tensor-parallel group of GPUs."""
    model: Model
    gpu: Gpu
    tp: int = 1
    tp_link: Link | None = None  # required when tp > 1
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError("tp must be >= 1")
        if self.tp > 1 and self.tp_link is None:
            raise ValueError("tp > 1 needs a tp_link for the all-reduce")
        for field in ("weight_dtype", "kv_dtype"):
            if getattr(self, field) not in DTYPE_BYTES:
                raise ValueError(f"{field} must be one of {sorted(DTYPE_BYTES)}")


def deployment(catalog: Catalog, model: str, gpu: str, tp: int = 1, tp_link: str | None = None,
               weight_dtype: str = "bf16", kv_dtype: str = "bf16") -> Deployment:
    """A deployment from catalog names, with the one link rule every caller shares: a TP group all-reduces
    over `tp_link`, by default its GPU's intra-node link (NVLink on HGX boards); one GPU needs no link."""
    m, g = catalog.model(model), catalog.gpu(gpu)
    link = catalog.link(tp_link or g.intra_node_link) if tp > 1 else None
    return Deployment(model=m, gpu=g, tp=tp, tp_link=link, weight_dtype=weight_dtype,
                      kv_dtype=kv_dtype)


class BatchShape(msgspec.Struct, kw_only=True):
    """What a step's cost depends on, summed over its sequences."""
    new_tokens: int = 0        # sum of n
    context_tokens: int = 0    # sum of c: cached KV each sequence reads
    attention_pairs: int = 0   # sum of n*c + n*(n+1)/2: causal (query, key) pairs
    sampled: int = 0           # sequences that produce a token this step (lm head + sampling)

    def add(self, new: int, cached: int, samples: bool = True) -> BatchShape:
        self.new_tokens += new
        self.context_tokens += cached
        self.attention_pairs += causal_pairs(new, cached)
        self.sampled += 1 if samples else 0
        return self


def causal_pairs(new: int, cached: int) -> int:
    """(query, key) pairs causal attention computes for `new` tokens after `cached` ones."""
    return new * cached + new * (new + 1) // 2


class StepTime(msgspec.Struct, frozen=True, kw_only=True):
    seconds: float
    bound: str          # "compute" or "memory": the ceiling behind most of the step's operator time
    compute_s: float    # summed over operators: their compute ceilings
    memory_s: float     # summed over operators: their memory ceilings
    comm_s: float
    overhead_s: float   # fixed step, per-layer and per-sequence costs


def batch_shape(chunks: Iterable[tuple[int, int]]) -> BatchShape:
    """Shape of a batch of (new tokens, cached tokens) chunks, each sampling one token."""
    shape = BatchShape()
    for new, cached in chunks:
        shape.add(new, cached)
    return shape

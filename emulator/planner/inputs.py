"""What the planner is asked: a workload, SLOs, and the deployment to plan for (plain msgspec data)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec

from emulator.engine_config import EngineConfig
from emulator.planner import dist
from emulator.planner.errors import PlannerError
from emulator.planner.tenant_limits import TenantLimit

Z99 = dist.normal_quantile(0.99)
Z90 = dist.normal_quantile(0.90)


class LengthDist(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts, given as samples or as summary numbers a lognormal is fitted to.

    Precedence: samples; p50 (or mean) with sigma; mean + p99 (the mean fixes throughput, the p99 the
    tail SLOs read); p50 + p99; mean + p90; p50 + p90; mean + p50; a single mean or p50 (every request
    the same length). `max` clips like a max_tokens / context limit.
    """
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    sigma: float | None = None      # lognormal shape, as in emulator.workload.LogNormal
    samples: list[int] | None = None
    max: int | None = None

    @classmethod
    def fixed(cls, tokens: int) -> LengthDist:
        return cls(mean=float(tokens))

    def points(self) -> dist.Points:
        pts = self._points()
        if self.max is not None:
            pts = dist.Points(pts.values.clip(1, self.max), pts.weights)
        if pts.values.min() < 1:
            pts = dist.Points(pts.values.clip(1, None), pts.weights)
        return pts

    def _points(self) -> dist.Points:
        if self.samples:
            return dist.from_samples(self.samples)
        mu, sigma = self._lognormal()
        return dist.lognormal(mu, sigma)

    def _lognormal(self) -> tuple[float, float]:
        m, p50, p90, p99 = self.mean, self.p50, self.p90, self.p99
        for name, value in (("mean", m), ("p50", p50), ("p90", p90), ("p99", p99), ("sigma", self.sigma)):
            if value is not None and (value <= 0 if name != "sigma" else value < 0):
                raise PlannerError(f"length {name} must be positive (got {value})")
        if self.sigma is not None and p50:
            return math.log(p50), self.sigma
        if self.sigma is not None and m:
            return math.log(m) - self.sigma ** 2 / 2, self.sigma
        if m and p99:
            return _fit_mean_tail(m, p99, Z99)
        if p50 and p99:
            return math.log(p50), max(0.0, math.log(p99 / p50) / Z99)
        if m and p90:
            return _fit_mean_tail(m, p90, Z90)
        if p50 and p90:
            return math.log(p50), max(0.0, math.log(p90 / p50) / Z90)
        if m and p50:
            return math.log(p50), math.sqrt(2 * math.log(m / p50)) if m > p50 else 0.0
        if m:
            return math.log(m), 0.0
        if p50:
            return math.log(p50), 0.0
        raise PlannerError("a length distribution needs samples, a mean or a p50")


def _fit_mean_tail(mean: float, tail: float, z: float) -> tuple[float, float]:
    """Lognormal with this mean and this upper quantile: ln(tail/mean) = z sigma - sigma^2/2."""
    if tail <= mean:
        return math.log(mean), 0.0
    disc = z * z - 2 * math.log(tail / mean)
    if disc < 0:
        raise PlannerError(f"a tail of {tail:g} tokens is too far above the mean {mean:g} for a lognormal "
                           "fit; give samples or a p50 instead")
    sigma = z - math.sqrt(disc)  # the smaller root: the larger one puts the tail below the median
    return math.log(mean) - sigma ** 2 / 2, sigma


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    rate: float                         # requests/s offered to the whole cluster (the target for sizing)
    prompt: LengthDist
    output: LengthDist                  # generated tokens per request, the first one included
    prefix_reuse: float = 0.0           # share of prompt tokens found in the prefix cache (vLLM's hit rate)
    burstiness: float = 1.0             # coefficient of variation of interarrival gaps (1 = Poisson)
    # Share of those cached tokens that are prefixes common to requests running together (system
    # prompts, shared documents: their blocks are held once); the rest (a session's own history) is
    # held by each request. Sets KV memory per running sequence, not compute.
    kv_sharing: float = 1.0
    # Shared-prefix tokens of each prompt sample (paired with prompt.samples). With them the cache
    # serves each prompt its own shared part (a mix's long code prompts share little, its RAG prompts
    # nearly all) instead of prefix_reuse of every prompt alike.
    shared: list[int] | None = None
    # Which shared prefix each prompt sample starts with (equal ids: the same blocks, a tenant's cache
    # salt included), paired with prompt.samples and shared. With them the planner predicts which
    # prefixes the LRU prefix cache still holds at each rate (emulator.planner.prefix_cache) instead
    # of assuming every shared prefix stays cached.
    prefix_groups: list[int] | None = None
    # prompt.samples[i] and output.samples[i] come from one request: the decode batch's time average
    # then weights each prompt by its own output (in a mix, long prompts often have long outputs).
    paired: bool = False

    def __post_init__(self):
        if not self.rate > 0:
            raise PlannerError(f"rate must be > 0 requests/s (got {self.rate})")
        if not 0 <= self.prefix_reuse < 1:
            raise PlannerError(f"prefix_reuse must be in [0, 1) (got {self.prefix_reuse})")
        if self.burstiness < 0:
            raise PlannerError(f"burstiness (CV of interarrival gaps) must be >= 0 (got {self.burstiness})")
        if not 0 <= self.kv_sharing <= 1:
            raise PlannerError(f"kv_sharing must be in [0, 1] (got {self.kv_sharing})")
        if self.shared is not None and len(self.shared) != len(self.prompt.samples or ()):
            raise PlannerError("shared needs one entry per prompt sample")
        if self.paired and len(self.prompt.samples or ()) != len(self.output.samples or ()):
            raise PlannerError("paired lengths need as many prompt as output samples")
        if self.prefix_groups is not None and (self.shared is None or len(self.prefix_groups) != len(self.shared)
                                               or len(self.output.samples or ()) != len(self.shared)):
            raise PlannerError("prefix_groups needs shared and output samples, one entry per prompt sample")

    @classmethod
    def from_samples(cls, rate: float, prompts: Sequence[int], outputs: Sequence[int],
                     shared: Sequence[int] | None = None, burstiness: float = 1.0,
                     groups: Sequence[int] | None = None) -> Workload:
        """From generated requests, each with its shared prefix (all shared prefixes assumed warm in the
        cache, as prefix-aware routing keeps them); prefix_reuse = shared / prompt tokens overall."""
        reuse = sum(shared) / sum(prompts) if shared else 0.0
        return cls(rate=rate, prompt=LengthDist(samples=list(prompts)), output=LengthDist(samples=list(outputs)),
                   prefix_reuse=min(reuse, 0.999), burstiness=burstiness,
                   shared=[int(s) for s in shared] if shared else None,
                   prefix_groups=[int(g) for g in groups] if groups is not None and shared else None,
                   paired=len(prompts) == len(outputs))


class Slo(msgspec.Struct, frozen=True, kw_only=True):
    ttft_p99: float                     # seconds
    itl_p99: float                      # seconds, over all inter-token gaps (vLLM's inter-token histogram)
    e2e_p99: float | None = None        # seconds

    def __post_init__(self):
        for name in ("ttft_p99", "itl_p99", "e2e_p99"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PlannerError(f"SLO {name} must be > 0 seconds (got {value})")


Mode = Literal["colocated", "disaggregated"]
Dispatch = Literal["random", "round_robin", "jsq"]


class PlanRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    gpu: str
    tp: int = 1
    tp_link: str | None = None          # None: the GPU's intra-node link (NVLink on HGX boards)
    kv_link: str = "InfiniBand-NDR"     # prefill -> decode KV handoff (the spec's default fabric)
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    mode: Mode = "colocated"
    price_per_gpu_hour: float = 0.0     # USD
    headroom: float = 1.0               # size for rate x headroom: bursts above the stated mean rate
    redundancy: int = 0                 # spare workers per pool (N+k): the plan survives k failures per pool
    # Target availability per pool (e.g. 0.999): spares from GPU failures and repairs (`spares`), at least
    # `redundancy`; None: `redundancy` alone. Defaults: the Llama 3 paper's failure rate, a day's repair.
    availability: float | None = None
    gpu_failures_per_hour: float | None = None
    repair_hours: float | None = None
    # How the router spreads requests: "random" (load-blind, e.g. prefix hashing: M/G/1 per worker),
    # "round_robin" (cyclic: smoother arrivals per worker), "jsq" (least loaded: one M/G/c pool).
    dispatch: Dispatch = "random"
    # Requests with the same prefix go to the same worker (prefix hashing, KV-aware scoring), so each
    # worker caches its share of the prefixes; False: spread over all workers (round robin, least
    # loaded), so every worker caches every prefix. Used with Workload.prefix_groups.
    cache_affinity: bool = True
    first_token_after_transfer: bool = False  # design 3b: False, the prefill worker emits token 1
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)  # the settings that change the numbers
    kv_wait_fraction: float = 0.01      # design 3b: at most 1% of requests may wait for KV blocks
    tenants: list[TenantLimit] = []     # the router's per-tenant limits (planner.tenant_limits)
    # Disaggregated: the router prefills a request on its decode worker when fewer prompt tokens than
    # this are uncached (pd_pair's conditional disaggregation); 0: every prefill on the prefill pool.
    local_prefill_tokens: int = 0

    def __post_init__(self):
        if self.tp < 1:
            raise PlannerError(f"tp must be >= 1 (got {self.tp})")
        if self.headroom < 1:
            raise PlannerError(f"headroom is a multiplier on the rate and must be >= 1 (got {self.headroom})")
        if self.redundancy < 0:
            raise PlannerError(f"redundancy (spare workers per pool) must be >= 0 (got {self.redundancy})")
        if self.price_per_gpu_hour < 0:
            raise PlannerError("price_per_gpu_hour must be >= 0")
        if self.availability is not None and not 0.0 < self.availability < 1.0:
            raise PlannerError(f"availability must be in (0, 1) (got {self.availability})")
        for name in ("gpu_failures_per_hour", "repair_hours"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise PlannerError(f"{name} must be a finite number >= 0 (got {value})")

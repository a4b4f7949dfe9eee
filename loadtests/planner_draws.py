"""Planner vs simulator on clusters drawn at random: the planner's C_max against the simulator's.

A draw picks a model (8B or 70B), GPU, TP degree, colocated or disaggregated (one prefill and one
decode worker), step budget (256-8192 tokens), max_num_seqs (32-1024), a mix of emulator.workload's
archetypes, and SLOs from tight to loose (multiples of what an idle worker achieves, so every draw is
feasible). Both sides read one spec. The simulator runs each rate alone (open-loop Poisson, warm-up
excluded) and its C_max is where p99 TTFT or p99 ITL first crosses the SLO (loadtests.analysis.c_max,
interpolated); its own noise is a block bootstrap of that crossing over time blocks of each run, and a
draw whose noise is over 3% is simulated again with more requests per rate (`quiet`).

Every rate of a draw sees the same requests at scaled times (the workload's streams are common random
numbers across rates, emulator.workload). Where a p99 is set by a few rare requests, independent draws
made it jump from rate to rate with which of them were drawn: a 70B H200 draw whose p99 TTFT is the
longest code prompts' own prefill read 1.33 s at 1.64 req/s, 1.20 at 1.80 and 1.52 at 1.97, and its
C_max came out 19% above the plan; on common requests its p99 rises with the rate and meets the plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from emulator import workload
from emulator.physics import roofline
from emulator.sim.report import served
from emulator.sim.simulator import Simulator
from emulator.spec import ClusterSpec, parse_spec
from loadtests import analysis, parallel_runs, planner_bridge

MODELS = {"Llama-3.1-8B": (1, 2), "Llama-3.1-70B": (2, 4, 8)}   # model -> TP degrees drawn from
GPUS = ("H100-SXM", "H200", "A100-80GB-SXM", "B200", "L40S", "MI300X")
BUDGETS = (256, 512, 1024, 2048, 4096, 8192)
SEQ_CAPS = (32, 64, 128, 256, 512, 1024)
ARCHETYPES = ("chat", "rag", "code", "agentic")
MIN_REQUESTS = 3000          # measured per rate (the bootstrap says what noise that leaves)
TARGET_NOISE = 0.03          # the simulated C_max's relative sd a comparison aims under (`quiet`)
MAX_REQUESTS = 30000         # ... with at most this many measured requests per rate
# requests the feasibility check of a draw samples: the set was drawn with them (a draw is kept or
# dropped by whether its SLOs can be met at all, which needs no tail precision), and the planner's
# 20,000 would make drawing 30 clusters take 30 s longer
FEASIBILITY_SAMPLES = 4000
BOOTSTRAP = 40               # replicates
BLOCKS = 20                  # time blocks per run (queueing runs are correlated over time: resample blocks)


@dataclass(frozen=True)
class Draw:
    index: int
    model: str
    gpu: str
    tp: int
    mode: str
    budget: int
    max_num_seqs: int
    mix: dict
    ttft_slo: float = 1.0
    itl_slo: float = 0.1
    # disaggregated: pd_pair prefills a prompt with fewer uncached tokens than this on its decode
    # worker (conditional disaggregation); the drawn set keeps 0, every prefill on the prefill pool
    local_prefill_tokens: int = 0

    def label(self) -> str:
        mix = "+".join(f"{k}{round(v * 100)}" for k, v in sorted(self.mix.items()))
        short = self.model.replace("Llama-3.1-", "")
        local = f" L{self.local_prefill_tokens}" if self.local_prefill_tokens else ""
        return f"{short} {self.gpu} tp{self.tp} {self.mode[:5]} b{self.budget} s{self.max_num_seqs} {mix}{local}"

    def spec(self) -> ClusterSpec:
        pools = ('[[pools]]\nrole = "both"\ncount = 1\n' if self.mode == "colocated" else
                 '[[pools]]\nrole = "prefill"\ncount = 1\n[[pools]]\nrole = "decode"\ncount = 1\n')
        router = ('policy = "round_robin"' if self.mode == "colocated" else
                  f'policy = "pd_pair"\nsettings = {{ local_prefill_tokens = {self.local_prefill_tokens} }}')
        mix = ", ".join(f"{k} = {v:.4f}" for k, v in self.mix.items())
        return parse_spec(f'''
name = "draw-{self.index}"
model = "{self.model}"
gpu = "{self.gpu}"
tp = {self.tp}
[engine]
max_num_batched_tokens = {self.budget}
max_num_seqs = {self.max_num_seqs}
{pools}
[router]
{router}
shedding = false
[slo]
ttft_p99_s = {self.ttft_slo:.6g}
itl_p99_s = {self.itl_slo:.6g}
[workload]
mix = {{ {mix} }}
''')


def draws(seed: int, n: int) -> list[Draw]:
    """n feasible draws from one seed (a draw the planner refuses, e.g. a model that does not fit, is
    replaced by the next)."""
    rng = np.random.default_rng(seed)
    out: list[Draw] = []
    while len(out) < n:
        d = _with_slos(_draw(rng, len(out)), rng)
        if d is not None:
            out.append(d)
    return out


def _draw(rng: np.random.Generator, index: int) -> Draw:
    model = str(rng.choice(list(MODELS)))
    kinds = [k for k in ARCHETYPES if rng.random() < 0.5] or [str(rng.choice(ARCHETYPES))]
    weights = rng.dirichlet(np.ones(len(kinds)))
    return Draw(index=index, model=model, gpu=str(rng.choice(GPUS)), tp=int(rng.choice(MODELS[model])),
                mode=str(rng.choice(["colocated", "disaggregated"])), budget=int(rng.choice(BUDGETS)),
                max_num_seqs=int(rng.choice(SEQ_CAPS)), mix={k: float(w) for k, w in zip(kinds, weights, strict=True)})


def _with_slos(d: Draw, rng: np.random.Generator) -> Draw | None:
    """SLOs from tight to loose, drawn log-uniformly: 1.5-8x the p99 prompt's prefill alone, 1.3-4x
    a one-sequence decode step (both from the roofline, so a planner change never moves the set);
    a draw the planner calls infeasible (or that does not fit) is dropped."""
    from emulator.planner import PlannerError, context
    from emulator.planner.api import check_feasible
    try:
        spec = d.spec()
        ttft_ref, itl_ref = _references(spec)
        ttft = ttft_ref * math.exp(rng.uniform(math.log(1.5), math.log(8.0)))
        itl = itl_ref * math.exp(rng.uniform(math.log(1.3), math.log(4.0)))
        drawn = Draw(**{**d.__dict__, "ttft_slo": float(ttft), "itl_slo": float(itl)})
        spec = drawn.spec()
        req, work, _, slo = planner_bridge.planner_inputs(spec, FEASIBILITY_SAMPLES)
        check_feasible(context.build(req, work, spec.catalog_data()), slo)
    except (PlannerError, ValueError):
        return None
    return drawn


def _references(spec: ClusterSpec) -> tuple[float, float]:
    """(p99 over sampled prompts of its prefill alone, a decode step of one sequence at the mean
    prompt), on the spec's prefill-capable and decode-capable deployments."""
    from router.frontdoor.drain import prefill_alone
    requests = workload.from_spec(spec, 1.0, num_requests=1000)
    block, budget = spec.engine.block_size, spec.engine.max_num_batched_tokens
    prefill_dep = spec.deployment(next(p for p in spec.pools if p.role != "decode"))
    decode_dep = spec.deployment(next(p for p in spec.pools if p.role != "prefill"))
    alone, prompts = [], []
    for r in requests:
        hit = (min(r.shared_tokens or 0, r.prompt_len - 1) // block) * block
        alone.append(prefill_alone(prefill_dep, r.prompt_len - hit, hit, budget))
        prompts.append(r.prompt_len)
    c = int(np.mean(prompts))
    one = roofline.step_time(decode_dep, roofline.BatchShape(new_tokens=1, context_tokens=c, attention_pairs=c + 1,
                                                             sampled=1)).seconds
    return float(np.percentile(alone, 99)), one


# -- the simulator's side -------------------------------------------------------------------------

@dataclass
class Run:
    """One rate through the simulator: per-request TTFTs and per-gap ITLs, with arrival times."""
    rate: float
    ttft: np.ndarray
    ttft_at: np.ndarray
    gaps: np.ndarray
    gaps_at: np.ndarray
    window: tuple[float, float]
    lifetime: float = 0.0    # mean arrival-to-last-token of the measured requests

    @property
    def ttft_p99(self) -> float:
        return float(np.percentile(self.ttft, 99)) if self.ttft.size else math.inf

    @property
    def itl_p99(self) -> float:
        return float(np.percentile(self.gaps, 99)) if self.gaps.size else math.inf

    def half(self, which: int) -> Run:
        """The requests and gaps that arrived in the first (0) or second (1) half of the window."""
        lo, hi = self.window
        mid = (lo + hi) / 2
        start, end = (lo, mid) if which == 0 else (mid, hi)
        i, j = np.searchsorted(self.ttft_at, [start, end])   # both sorted by arrival (see `_simulate`)
        k, m = np.searchsorted(self.gaps_at, [start, end])
        return Run(rate=self.rate, ttft=self.ttft[i:j], ttft_at=self.ttft_at[i:j], gaps=self.gaps[k:m],
                   gaps_at=self.gaps_at[k:m], window=(start, end), lifetime=self.lifetime)


def warmup_s(spec: ClusterSpec, rate: float) -> float:
    """Long enough to fill the decode batch (200 arrivals, 20 s at least) and, with agentic
    sessions in the mix, for their turns to reach steady state: three mean session lifetimes
    (turns x think time). A shorter warm-up measures sessions still in their first turns, whose
    histories, and so prompts and contexts, are shorter than the steady mix the planner samples
    (docs/conventions.md#steady-state)."""
    base = max(20.0, 200.0 / rate)
    if "agentic" not in spec.workload.mix:
        return base
    arch = workload.make_archetype("agentic", spec.workload.params.get("agentic"))
    assert isinstance(arch, workload.Agentic)
    return max(base, 3.0 * arch.turns.mean * arch.think_s.mean)


def simulate(spec: ClusterSpec, rate: float, requests: int = MIN_REQUESTS) -> Run:
    """`requests` measured arrivals after the warm-up (`warmup_s`), and as many more as the window
    needs to span WINDOW_LIFETIMES request lifetimes, with a warm-up of WARMUP_LIFETIMES (`_span`):
    the lifetime comes from a first run, which is kept when it was long enough."""
    run = _simulate(spec, rate, warmup_s(spec, rate), requests / rate)
    warmup, window = _span(run, rate, requests)
    if warmup > run.window[0] or window > run.window[1] - run.window[0]:
        run = _simulate(spec, rate, warmup, window)
    return run


WINDOW_LIFETIMES = 100.0   # measured window, in mean request lifetimes (see `_span`)
WARMUP_LIFETIMES = 10.0


def _span(run: Run, rate: float, requests: int) -> tuple[float, float]:
    """(warm-up, window) in seconds long enough for this run's state to forget itself many times over.

    The running batch is what TTFT's tail follows (a long prompt prefills with the step budget the
    running decodes leave), and it changes on the time scale of a request's lifetime L, stretched
    near the knee because every sequence slows every other (the relaxation of the birth-death count,
    L / (1 - slope), two to three L there). A fixed count of requests at a high rate spans too few
    of those: 3,000 requests at 19 req/s with 4.7 s lifetimes are 158 s, and their p99 TTFT read
    0.34 s, where 15,000 read 0.25 s (8B H100, 256-token budget); the per-block p99s of the short
    run ranged 0.13-0.42 s. A window of WINDOW_LIFETIMES L has each of the bootstrap's BLOCKS
    blocks five lifetimes long, about two relaxation times, so the blocks are nearly independent
    and the bootstrap's noise is honest."""
    return (max(run.window[0], WARMUP_LIFETIMES * run.lifetime),
            max(requests / rate, WINDOW_LIFETIMES * run.lifetime))


def _simulate(spec: ClusterSpec, rate: float, warmup: float, window: float) -> Run:
    end = warmup + window
    sim = Simulator(spec).run(workload.from_spec(spec, rate, duration_s=end))
    done = [r for r in served(sim.log.records.values()) if warmup <= r.arrival < end]
    gaps = np.frombuffer(sim.log.gaps, dtype=np.float32).astype(float)
    at = np.frombuffer(sim.log.gap_arrivals, dtype=np.float64)
    inside = (at >= warmup) & (at < end)
    order = np.argsort(at[inside], kind="stable")            # by arrival, for the bootstrap's blocks
    ttft_at = np.asarray([r.arrival for r in done])
    first = np.argsort(ttft_at, kind="stable")
    lifetime = float(np.mean([r.last - r.arrival for r in done])) if done else 0.0
    return Run(rate=rate, ttft=np.asarray([r.ttft for r in done])[first], ttft_at=ttft_at[first],
               gaps=gaps[inside][order], gaps_at=at[inside][order], window=(warmup, end), lifetime=lifetime)


@dataclass
class Agreement:
    draw: Draw
    planned: float
    binding: str
    simulated: float | None
    bound: str                 # analysis.c_max's: "interpolated", "bracket", "at_least", "below"
    culprit: str               # which p99 crosses first in the simulator
    noise: float | None        # relative sd of the simulated C_max (block bootstrap)
    halves: float | None = None  # C_max from the windows' second halves / from their first halves - 1;
    # inf where a half's runs do not cross the SLO between the rates the whole's do (`_halves`)
    runs: list[Run] = field(default_factory=list, repr=False)
    cpu_s: float = 0.0
    requests: int = MIN_REQUESTS   # measured requests per rate (at least)
    earlier: list[tuple[int, float | None, float | None]] = field(default_factory=list)  # `quiet`'s noisier
    # passes: (requests, gap, noise)

    @property
    def gap(self) -> float | None:
        return self.planned / self.simulated - 1 if self.simulated else None


def compare(d: Draw, requests: int = MIN_REQUESTS, seed: int = 0) -> Agreement:
    """The planner's C_max, then the simulator stepped around it until the SLO crossing is bracketed."""
    started = time.process_time()
    spec = d.spec()
    from emulator import planner
    req, work, cluster, slo = planner_bridge.planner_inputs(spec)
    cap = planner.capacity(req, work, slo, cluster, catalog=spec.catalog_data())
    first = (0.9, 1.1)   # independent runs: side by side on the host's cores
    runs = dict(zip(first, parallel_runs.run_all(simulate, [(spec, cap.max_rate * f, requests) for f in first]),
                    strict=True))
    ok = {f: _meets(r, d) for f, r in runs.items()}
    factors = iter((1.25, 1.5, 2.0, 3.0) if ok[1.1] else (0.8, 0.65, 0.5, 0.35, 0.2) if not ok[0.9] else ())
    while (all(ok.values()) or not any(ok.values())):
        f = next(factors, None)
        if f is None:
            break
        runs[f] = simulate(spec, cap.max_rate * f, requests)
        ok[f] = _meets(runs[f], d)
    _refine(spec, d, cap.max_rate, runs, requests)
    ordered = [runs[f] for f in sorted(runs)]
    found = _c_max(ordered, d)
    return Agreement(draw=d, planned=cap.max_rate, binding=cap.binding, simulated=found.rate, bound=found.bound,
                     culprit=found.limited_by, noise=_noise(ordered, d, seed), halves=_halves(ordered, d),
                     runs=ordered, cpu_s=time.process_time() - started, requests=requests)


def quiet(d: Draw, requests: int = MIN_REQUESTS, target: float = TARGET_NOISE,
          most: int = MAX_REQUESTS) -> Agreement:
    """`compare`, again with more requests per rate while the simulator's own noise is above `target`.

    Where prompts are heavy-tailed, p99 TTFT is set by a few very long prompts and the requests queued
    behind them, and a window of a few thousand requests holds a handful of those: on an 8B L40S draw
    (code prompts up to 16K tokens, 1 s of prefill each) the p99 TTFT of consecutive 3,000-request
    windows at one rate ranged 0.49-0.68 s (30,000 requests: 0.557 s, the planner 0.566 s), and the
    window the comparison happened to measure read 0.662 s, and the plan came out 36% above that C_max. The
    bootstrap sees that spread (8.8%): the sd of a p99 falls as 1 / sqrt(requests), so the rerun
    takes (noise / target)^2 times as many (a tenth more, as the estimate is itself noisy).

    The bootstrap reads the spread of the blocks it has; where the tail is set by prompts rarer than
    one a block, it understates (draw #25 read 1.7% at 7,663 requests and a gap of +12.9%, then
    +3.7% at 20,000 and +2.4% at 30,000). So the two halves of each window are also compared (`_halves`): their
    C_maxs differ by about 2 sd of the whole's (each half has sqrt(2) times its sd), and a
    disagreement past that counts as noise too (`_spread`); halves that do not even cross the SLO
    where the whole does send it on with HALVES_APART times the requests."""
    started = time.process_time()
    found = compare(d, requests)
    earlier: list[tuple[int, float | None, float | None]] = []
    while (spread := _spread(found)) is not None and spread > target and requests < most:
        earlier.append((requests, found.gap, spread))
        more = (spread / target) ** 2 if math.isfinite(spread) else HALVES_APART
        requests = min(most, math.ceil(requests * 1.1 * more))
        found = compare(d, requests)
    found.cpu_s = time.process_time() - started
    found.requests, found.earlier = requests, earlier
    return found


REFINE_WIDTH = 0.04     # a bracket narrower than this is interpolated as it is
REFINE_OVER = 1.25      # ... and so is one whose failing p99 is within 25% of its SLO
REFINE_RUNS = 3


def _refine(spec: ClusterSpec, d: Draw, planned: float, runs: dict[float, Run], requests: int) -> None:
    """Bisect the bracket around the SLO crossing while its failing end is far past the SLO.

    Interpolating log(p99) linearly in rate is sound near the crossing; across a knee it is not: with
    the passing run at 0.16 s and the failing one past saturation (30 s), the crossing of 0.24 s came
    out at 2% above the passing rate wherever the knee really was (the 256-token colocated draw: 18.0
    req/s reported while 19 req/s kept p99 TTFT at 0.18 s). Each bisection halves the bracket."""
    for _ in range(REFINE_RUNS):
        ordered = sorted(runs)
        ok = [_meets(runs[f], d) for f in ordered]
        if ok[0] is False or all(ok):
            return
        k = ok.index(False)
        lo, hi = ordered[k - 1], ordered[k]
        if hi / lo - 1 <= REFINE_WIDTH or _overshoot(runs[hi], d) <= REFINE_OVER:
            return
        mid = math.sqrt(lo * hi)
        runs[mid] = simulate(spec, planned * mid, requests)


def _overshoot(run: Run, d: Draw) -> float:
    """How far past its SLO the worse p99 of a run is (inf when no p99 could be taken)."""
    return max(run.ttft_p99 / d.ttft_slo, run.itl_p99 / d.itl_slo)


def _meets(run: Run, d: Draw) -> bool:
    return run.ttft_p99 <= d.ttft_slo and run.itl_p99 <= d.itl_slo


def _c_max(runs: list[Run], d: Draw, p99s=None) -> analysis.Capacity:
    t, i = zip(*(p99s or [(r.ttft_p99, r.itl_p99) for r in runs]), strict=True)
    return analysis.c_max([r.rate for r in runs], t, i, d.ttft_slo, d.itl_slo)


def _noise(runs: list[Run], d: Draw, seed: int) -> float | None:
    """Relative sd of the simulated C_max over block-bootstrap replicates of every run."""
    base = _c_max(runs, d)
    if base.bound != "interpolated" or not base.rate:
        return None
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(BOOTSTRAP):
        cap = _c_max(runs, d, [resampled(r, rng) for r in runs])
        if cap.bound == "interpolated" and cap.rate:
            found.append(cap.rate)
    return float(np.std(found) / base.rate) if len(found) > 1 else None


HALVES_APART = 4.0   # times the requests `quiet` takes when a half does not even cross where the whole
                     # does: what a spread of twice the target asks ((2 x target / target)^2)


def _halves(runs: list[Run], d: Draw) -> float | None:
    """C_max measured on the windows' second halves over that on their first halves, minus 1: a
    stationarity check (a run still drifting, or a tail set by a few rare prompts, reads differently).
    None where the whole's C_max is not interpolated; inf where a half's is not (its p99s meet the SLO
    at every rate, or at none: the halves disagree past what a ratio says)."""
    if _c_max(runs, d).bound != "interpolated":
        return None
    first, second = (_c_max([r.half(k) for r in runs], d) for k in (0, 1))
    if first.bound != "interpolated" or second.bound != "interpolated" or not first.rate or not second.rate:
        return math.inf
    return second.rate / first.rate - 1


def _spread(found: Agreement) -> float | None:
    """The noise `quiet` steers by: the bootstrap's sd, or half the halves' disagreement if larger
    (the difference of two halves has twice the whole's sd)."""
    if found.noise is None:
        return None
    return max(found.noise, abs(found.halves) / 2) if found.halves is not None else found.noise


def resampled(run: Run, rng: np.random.Generator) -> tuple[float, float]:
    """(p99 TTFT, p99 ITL) of the run with its time blocks drawn with replacement."""
    lo, hi = run.window
    edges = np.linspace(lo, hi, BLOCKS + 1)
    pick = rng.integers(0, BLOCKS, BLOCKS)
    ttft = np.concatenate([_block(run.ttft, run.ttft_at, edges, k) for k in pick])
    gaps = np.concatenate([_block(run.gaps, run.gaps_at, edges, k) for k in pick])
    p = lambda a: float(np.percentile(a, 99)) if a.size else math.inf  # noqa: E731
    return p(ttft), p(gaps)


def _block(values: np.ndarray, at: np.ndarray, edges: np.ndarray, k: int) -> np.ndarray:
    i, j = np.searchsorted(at, [edges[k], edges[k + 1]])   # `at` is sorted (see `simulate`)
    return values[i:j]

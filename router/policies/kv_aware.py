"""KV-aware routing, Dynamo-style: trade the cached prefix a worker holds against its load.

    score = overlap_weight * matched_blocks / prompt_blocks
            - load_weight * load / max(load over healthy workers, 1)
            - kv_weight * kv_usage

With a host KV tier (KvIndex.host_credit set) matched_blocks counts a worker's HBM blocks plus its
host-held blocks after them at host_credit each: what onboarding them saves against recomputing them,
from the roofline (emulator.physics.steptime.host_hit_credit), not a fixed weight.

The worker with the highest score wins. Loads are normalized by the busiest worker, so equal loads
cost nothing and the cache decides; with the defaults a worker holding the whole prompt still beats
an idle worker holding none, but a half-cached prompt goes to an idle worker rather than the busiest
one. Ties (cold prompts at equal load) fall to a rendezvous hash of the prompt's leading blocks, so
the same cold prefix lands on the same worker and starts building locality there.
"""
from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import Decision, RouteRequest, StatelessPolicy, WorkerView, healthy, prefix_key, rendezvous
from router.policies.kv_index import KvIndex
from router.policies.prefix_ring import DEFAULT_PREFIX_BLOCKS

LOAD_METRICS = ("in_flight", "queue")


class KvAware(StatelessPolicy):
    name = "kv_aware"

    def __init__(self, index: KvIndex, overlap_weight: float = 1.0, load_weight: float = 0.5,
                 kv_weight: float = 0.0, load_metric: str = "in_flight",
                 prefix_blocks: int = DEFAULT_PREFIX_BLOCKS) -> None:
        if load_metric not in LOAD_METRICS:
            raise ValueError(f"kv_aware load_metric must be one of {LOAD_METRICS}, got {load_metric!r}")
        self.index = index
        self.overlap_weight = overlap_weight
        self.load_weight = load_weight
        self.kv_weight = kv_weight
        self.load_metric = load_metric
        self.prefix_blocks = prefix_blocks

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        alive = healthy(workers)
        matched = self.index.credited_match(request.blocks)
        blocks = max(len(request.blocks), 1)
        loads = [self._load(w) for w in alive]
        scale = max(max(loads), 1)
        best: list[tuple[tuple, WorkerView]] = []
        for worker, load in zip(alive, loads, strict=True):
            hit = matched.get(worker.id, 0)
            score = (self.overlap_weight * hit / blocks - self.load_weight * load / scale
                     - self.kv_weight * worker.kv_usage)
            rank = (round(score, 12), hit, -load)  # rounding: equal in exact arithmetic means a tie
            if not best or rank > best[0][0]:
                best = [(rank, worker)]
            elif rank == best[0][0]:
                best.append((rank, worker))
        (score, hit, _), winner = best[0]
        if len(best) > 1:
            key = prefix_key(request, self.prefix_blocks)
            winner = max((w for _, w in best), key=lambda w: rendezvous(key, w.id))
        return Decision(worker=winner.id, policy=self.name, matched_blocks=round(hit), score=score)

    def _load(self, worker: WorkerView) -> int:
        if self.load_metric == "queue":
            return worker.running + worker.waiting
        return worker.in_flight

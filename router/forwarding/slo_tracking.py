"""The HTTP router's side of slo_aware: its queue ledger (router.policies.slo_ledger, the same glue the
simulator drives), the SLO headers turned into the policy's emulated seconds, and predicted against
actual TTFT: one log line per request and a histogram of the relative error.

Times: the table and the policy work in emulated seconds; the router measures wall seconds, which a
worker's time_scale turns into emulated ones (as router.forwarding.stream_timing does for TTFT/ITL).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from router.frontdoor.slo_headers import SloTarget
from router.observability.metrics import RouterMetrics
from router.policies.base import Decision, RouteRequest, WorkerView
from router.policies.slo_ledger import PrefillLedger

log = logging.getLogger("kvlab.router.slo")


class SloTracker:
    def __init__(self, metrics: RouterMetrics, time_scale: float = 1.0) -> None:
        self.ledger = PrefillLedger()
        self.metrics = metrics
        self.time_scale = time_scale   # wall seconds per emulated second (the spec's engine.time_scale)

    def targets(self, route: RouteRequest, target: SloTarget | None) -> None:
        """Put the request's wall-time SLOs on its route, in emulated seconds."""
        if target is not None:
            route.slo_ttft_s = None if target.ttft_s is None else target.ttft_s / self.time_scale
            route.slo_tpot_s = None if target.tpot_s is None else target.tpot_s / self.time_scale

    def now(self) -> float:
        """The router's clock in emulated seconds (the ledger's prefill-rate clock)."""
        return time.perf_counter() / self.time_scale

    def fill(self, views: Sequence[WorkerView]) -> None:
        self.ledger.fill(views, self.now())

    def sent(self, key: str, decision: Decision, prompt_tokens: Callable[[], int]) -> None:
        """An attempt went out; a retry's new decision replaces the old one's entry. The ledger keeps
        only decisions with a predicted TTFT (slo_aware's), and only those read the prompt's length:
        where routing tokenized just the prompt's head, counting it all would tokenize the rest."""
        self.ledger.ended(key)
        if decision.predicted_ttft_s is not None:
            self.ledger.sent(key, decision, prompt_tokens(), self.now())

    def first_token(self, key: str, worker_id: str, received: float, policy: str,
                    scale: float | None = None) -> None:
        """The client got the first token; `received` is when the router got the request
        (perf_counter), `scale` the serving worker's time scale when known."""
        wall = time.perf_counter() - received
        pair = self.ledger.first_token(key, wall / (scale or self.time_scale))
        if pair is None:
            return
        predicted, actual = pair
        error = abs(predicted - actual) / actual if actual > 0 else 0.0
        self.metrics.ttft_prediction_error.labels(policy).observe(error)
        log.info("ttft worker=%s predicted_s=%.4f actual_s=%.4f error=%.3f", worker_id, predicted, actual, error)

    def ended(self, key: str) -> None:
        self.ledger.ended(key)

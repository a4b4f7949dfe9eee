"""The router-side queue estimate slo_aware reads, and its predicted-vs-actual TTFT, one glue for the
simulator and the HTTP proxy alike (pure: the caller says when things happen and what they measured).

    ledger.fill(views, now)                         # before a choice that reads them (PolicySet.reads_queues)
    ledger.sent(request_id, decision, prompt_tokens, now)   # the request went to decision.worker
    ledger.first_token(request_id, actual_ttft_s)   # -> (predicted, actual) or None: settles its prefill
    ledger.ended(request_id)                        # finished, failed or cancelled: forget it

A request is in its worker's prefill queue from `sent` until its first token (its uncached tokens and
the policy's predicted marginal prefill seconds), then in that worker's decode batch (its prompt tokens
are context the decode steps read) until `ended`. `now` (emulated seconds on the caller's clock; the
ledger reads none) times the rate of prefill tokens sent to each worker, an exponentially weighted
average over RATE_TAU_S: prompts that arrive while one waits share its last step.

Step phase: a first token leaves its worker at the end of an engine step, so `sent` time + the actual
TTFT the caller reports is a step end there; so is `now` when a request is sent to a worker that had
nothing in flight (its engine starts a step at once). fill() gives each view the age of the latest such
step end (step_age_s), from which slo_aware places the step in progress instead of assuming half a step.

Only decisions that carry a prediction (slo_aware's) enter the ledger; the others' queues are invisible
to it, and the drivers fill the views only for slo_aware's choices (a router whose requests name other
policies spends nothing here; where policies mix, a worker's idle flag is as of the last slo_aware choice).
slo_aware keeps its own figures rather than trusting scraped engine counts (stale by a scrape).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from router.policies.base import Decision, WorkerView

# Time constant of the prefill-token rate per worker: long enough to average a few dozen arrivals at
# tens of requests per second per worker, short enough to follow a burst.
RATE_TAU_S = 1.0


class _Queue:
    __slots__ = ("requests", "tokens", "seconds", "context", "rate", "rate_at", "step_end", "idle")

    def __init__(self) -> None:
        self.requests, self.tokens, self.seconds, self.context = 0, 0, 0.0, 0
        self.rate, self.rate_at = 0.0, 0.0   # prefill tokens per second sent here, as of rate_at
        self.step_end: float | None = None   # the latest step end seen there (emulated seconds)
        self.idle = True                     # nothing in flight there at the last fill()

    def rate_now(self, now: float) -> float:
        if now > self.rate_at:
            self.rate *= math.exp(-(now - self.rate_at) / RATE_TAU_S)
            self.rate_at = now
        return self.rate


class _Entry:
    __slots__ = ("worker", "tokens", "seconds", "prompt", "predicted", "prefilling", "sent_at")

    def __init__(self, worker: str, tokens: int, seconds: float, prompt: int, predicted: float,
                 sent_at: float | None) -> None:
        self.worker, self.tokens, self.seconds, self.prompt = worker, tokens, seconds, prompt
        self.predicted = predicted
        self.prefilling = True
        self.sent_at = sent_at


class PrefillLedger:
    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self.entries: dict[str, _Entry] = {}   # requests sent with a predicted TTFT, until they end

    def fill(self, views: Iterable[WorkerView], now: float | None = None) -> None:
        for view in views:
            q = self._queues.get(view.id)
            if q is None:
                q = self._queues[view.id] = _Queue()
            q.idle = view.in_flight == 0
            view.prefill_queue, view.prefill_queue_tokens = q.requests, q.tokens
            view.prefill_queue_s, view.decode_context_tokens = max(0.0, q.seconds), q.context
            # A zero rate stays zero (its clock is moved by ``sent``, which reads rate_now first).
            view.prefill_rate = q.rate_now(now) if now is not None and q.rate else 0.0
            seen = now is not None and q.step_end is not None and q.step_end <= now
            view.step_age_s = now - q.step_end if seen else None   # type: ignore[operator]

    def sent(self, request_id: str, decision: Decision, prompt_tokens: int, now: float | None = None) -> None:
        if decision.predicted_ttft_s is None or request_id in self.entries:
            return
        entry = _Entry(decision.worker, decision.prefill_tokens or 0, decision.prefill_work_s or 0.0,
                       prompt_tokens, decision.predicted_ttft_s, now)
        self.entries[request_id] = entry
        q = self._queues.setdefault(entry.worker, _Queue())
        if q.idle and now is not None:   # an idle engine starts its first step on arrival
            q.step_end, q.idle = now, False
        q.requests += 1
        q.tokens += entry.tokens
        q.seconds += entry.seconds
        if now is not None:
            q.rate = q.rate_now(now) + entry.tokens / RATE_TAU_S

    def first_token(self, request_id: str, actual_ttft_s: float) -> tuple[float, float] | None:
        """Move the request from its worker's prefill queue to its decode batch; (predicted, actual)."""
        entry = self.entries.get(request_id)
        if entry is None or not entry.prefilling:
            return None
        self._settle(entry)
        entry.prefilling = False
        q = self._queues[entry.worker]
        q.context += entry.prompt
        if entry.sent_at is not None:   # the first token left at the end of a step there
            end = entry.sent_at + actual_ttft_s
            q.step_end = end if q.step_end is None else max(q.step_end, end)
        return entry.predicted, actual_ttft_s

    def ended(self, request_id: str) -> None:
        entry = self.entries.pop(request_id, None)
        if entry is None:
            return
        if entry.prefilling:
            self._settle(entry)
        else:
            self._queues[entry.worker].context -= entry.prompt

    def forget_worker(self, worker_id: str) -> None:
        """A worker left: its requests are gone with it."""
        self._queues.pop(worker_id, None)
        for request_id in [r for r, e in self.entries.items() if e.worker == worker_id]:
            del self.entries[request_id]

    def _settle(self, entry: _Entry) -> None:
        q = self._queues[entry.worker]
        q.requests -= 1
        q.tokens -= entry.tokens
        q.seconds -= entry.seconds

    def __len__(self) -> int:
        return len(self.entries)

"""One request's routing, shared by the router's proxy and the simulator: choose -> lease -> plan -> release.

- ``choose``: the policy's decision among the workers it may pick (``routable``): not excluded by an
  earlier failed attempt, and never a prefill-role worker for a colocated policy (only ``pd_pair``
  pairs a prefill with a decode worker; any other policy sends whole requests).
- ``charge``: a ``Lease`` on the decision's workers: their in-flight charges, taken at once and released
  once per worker as its part ends; load-aware policies read these counts on the next decision.
- ``plan``: P/D sequencing: which worker gets the prompt first and which decodes after the hand-off.

Pure: plain data and the caller's worker objects, no I/O, no clock.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import msgspec

from router.policies.base import Decision, RouteRequest, WorkerView
from router.policies.registry import PolicySet

PAIRING_POLICIES = frozenset({"pd_pair"})   # the policies that route to prefill-role workers


class Chargeable(Protocol):
    """A worker whose in-flight count a lease moves (the router's pool worker, the simulator's worker)."""
    @property
    def id(self) -> str: ...
    def charge(self) -> None: ...
    def release(self) -> None: ...


W = TypeVar("W", bound=Chargeable)


def routable(views: Sequence[WorkerView], policy: str, exclude: Collection[str] = ()) -> Sequence[WorkerView]:
    """The workers `policy` may pick: not in `exclude`, and no prefill-role worker unless it pairs P/D."""
    colocated = policy not in PAIRING_POLICIES
    if not exclude and (not colocated or not _has_prefill(views)):
        return views   # the common case: nothing to drop, no copy
    return [v for v in views if v.id not in exclude and not (colocated and v.role == "prefill")]


def _has_prefill(views: Sequence[WorkerView]) -> bool:
    for view in views:   # a plain loop: about three times cheaper than any() over a generator here
        if view.role == "prefill":
            return True
    return False


def choose(policies: PolicySet, request: RouteRequest, views: Sequence[WorkerView],
           exclude: Collection[str] = (), line: int | None = None) -> Decision:
    """The decision for `request` (its own policy if it names one), kept inside a worker's `line` (the
    load shedder's places per worker; None: no shedder); raises NoWorkerAvailable."""
    candidates = routable(views, request.policy or policies.default, exclude)
    decision = policies.choose(request, candidates)
    if line is None:
        return decision
    return keep_in_line(decision, candidates, line, lambda room: policies.choose(request, room))


def keep_in_line(decision: Decision, views: Sequence[WorkerView], line: int,
                 rechoose: Callable[[Sequence[WorkerView]], Decision]) -> Decision:
    """The shedder admits a request while the workers' lines together have room
    (router.frontdoor.gate.DrainLimit), but its TTFT promise holds only inside the request's own
    worker's line. A choice whose line is full (a prefix's owner, a hash ring's home) is made again by
    the same policy among the workers whose lines have room (`rechoose`), so the request keeps what
    the policy values most there (a cached prefix elsewhere, the ring's next worker) and the SLO. P/D
    pairs and slo_aware's choices (which predict their own TTFT) are left as they are."""
    if decision.policy in PAIRING_POLICIES or decision.predicted_ttft_s is not None:
        return decision
    chosen = next((v for v in views if v.id == decision.worker), None)
    if chosen is None or chosen.queued < line:
        return decision
    room = [v for v in views if v.healthy and v.queued < line]
    if not room:
        return decision   # every line is full: the shedder's next check refuses
    return msgspec.structs.replace(rechoose(room), line_full=decision.worker)


class Lease(Generic[W]):
    """The in-flight charges of one attempt; each worker is released exactly once."""
    __slots__ = ("workers",)

    def __init__(self, workers: Sequence[W]):
        self.workers = list(workers)
        for worker in self.workers:
            worker.charge()

    def release(self, worker: W) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
            worker.release()

    def release_all(self) -> None:
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.release()


class Plan(NamedTuple):
    first: str            # gets the prompt first: the prefill worker under P/D, else the serving worker
    decode: str | None    # P/D: decodes after the hand-off (the decision's worker); None: `first` does it all


def plan(decision: Decision) -> Plan:
    """Where the request goes, in order. A prefill worker equal to the decode worker means a local prefill."""
    if decision.prefill_worker is None or decision.prefill_worker == decision.worker:
        return Plan(decision.worker, None)
    return Plan(decision.prefill_worker, decision.worker)


def charge(decision: Decision, worker: Callable[[str], W]) -> Lease[W]:
    """Charge every worker the decision names (`worker` looks one up by id) until its part ends."""
    if decision.prefill_worker is None:   # the common case: one worker, named directly
        return Lease((worker(decision.worker),))
    return Lease([worker(worker_id) for worker_id in decision.charged])

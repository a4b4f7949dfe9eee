"""Endless supplies of workload requests for closed-loop users, one per archetype, shared in a process.

All users of an archetype draw from one pool, so they share its system prompts and documents as real
users of one deployment do; a pool refills in batches from emulator.workload with the next seed.
"""
from __future__ import annotations

from collections import defaultdict, deque

from emulator import workload
from emulator.workload import Request

BATCH = 1000   # requests per refill: ~0.3 s of generation, rare enough not to disturb the load much


class RequestPool:
    def __init__(self, archetype: str, params: dict | None = None, seed: int = 0):
        self.archetype = archetype
        self.params = {archetype: params} if params else None
        self.seed = seed
        self._queue: deque[Request] = deque()        # single requests, or agentic sessions' first turns
        self._sessions: dict[str, list[Request]] = {}

    def warm(self) -> None:
        """Generate the first batch now (generation blocks every greenlet: do it before the test)."""
        if not self._queue:
            self._refill()

    def next(self) -> Request:
        self.warm()
        return self._queue.popleft()

    def next_session(self) -> list[Request]:
        """The turns of one agentic session, in order (agentic pools only)."""
        first = self.next()
        if first.session_id is None:
            return [first]
        return self._sessions.pop(first.session_id, [first])

    def _refill(self) -> None:
        requests = workload.generate(1.0, num_requests=BATCH, mix={self.archetype: 1.0}, params=self.params,
                                     seed=self.seed, with_text=True)
        self.seed += 1
        sessions: dict[str, list[Request]] = defaultdict(list)
        for r in requests:
            if r.session_id is not None:
                sessions[r.session_id].append(r)
        self._sessions = dict(sessions)
        self._queue.extend(r for r in requests if r.session_id is None or r.turn == 0)

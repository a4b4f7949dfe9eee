"""Closed-loop streaming load from a background thread, for tests that watch a live cluster.

``BackgroundLoad(url, make, concurrency)`` runs `concurrency` loops on their own event loop, each
sending ``make(i)`` -> (body, headers) as a streaming /v1/completions request, reading it to the end,
and sending the next, until the context exits; streams still open then are cancelled (the client
goes away, so workers abort them). ``statuses`` counts answers by HTTP status.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import Callable

import httpx

Make = Callable[[int], tuple[dict, dict]]


class BackgroundLoad:
    def __init__(self, url: str, make: Make, concurrency: int = 4):
        self.url = url
        self.make = make
        self.concurrency = concurrency
        self.statuses: Counter[int] = Counter()
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="background-load", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30, trust_env=False) as client:
            loops = [asyncio.create_task(self._loop(client)) for _ in range(self.concurrency)]
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _loop(self, client: httpx.AsyncClient) -> None:
        while True:
            body, headers = self.make(next(self._numbers))
            try:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                                         headers=headers) as response:
                    async for _ in response.aiter_bytes():
                        pass
                self.statuses[response.status_code] += 1
                if response.status_code != 200:
                    await asyncio.sleep(0.05)   # refused: do not spin
            except httpx.HTTPError:
                self.statuses[0] += 1
                await asyncio.sleep(0.05)

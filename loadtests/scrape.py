"""Polls the workers during a run: prefix-cache counters and lag, timestamped for window deltas.

kvlab workers answer /load with JSON (counters, lag p99/max over recent steps, time scale); any other
server (vLLM) is read from /metrics with vLLM's metric names. Counters are cumulative, so a window's
hit rate is the delta of hits over the delta of queries between the samples around it.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

import httpx

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


@dataclass
class Sample:
    t: float                              # time.time() when read
    hits: float = 0.0                     # prefix-cache hit tokens (cumulative)
    queries: float = 0.0                  # prefix-cache queried tokens (cumulative)
    preemptions: float = 0.0
    lag_p99_s: float | None = None        # kvlab workers only: recent step lateness (wall s)
    lag_max_s: float | None = None
    time_scale: float | None = None
    in_system: float | None = None        # kvlab workers only: requests running + waiting


@dataclass
class WindowStats:
    prefix_hit_rate: float | None
    preemptions: int
    lag_p99_s: float | None               # worst worker's recent-lag p99 seen inside the window
    lag_max_s: float | None


def _in_system(load: dict) -> float | None:
    if load.get("running") is None:
        return None
    return float(load.get("running", 0)) + float(load.get("waiting", 0))


def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name -> value summed over label sets; counters are keyed without their _total suffix."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name = m.group(1).removesuffix("_total")
        try:
            out[name] = out.get(name, 0.0) + float(m.group(3))
        except ValueError:
            continue
    return out


def read_worker(client: httpx.Client, url: str) -> Sample:
    now = time.time()
    response = client.get(f"{url}/load")
    if response.status_code == 200:
        d = response.json()
        return Sample(now, d.get("prefix_cache_hits", 0.0), d.get("prefix_cache_queries", 0.0),
                      d.get("preemptions", 0.0), d.get("lag_p99_s"), d.get("lag_max_s"), d.get("time_scale"),
                      _in_system(d))
    m = parse_prometheus(client.get(f"{url}/metrics").text)
    return Sample(now, m.get("vllm:prefix_cache_hits", 0.0), m.get("vllm:prefix_cache_queries", 0.0),
                  m.get("vllm:num_preemptions", 0.0))


class Scraper:
    """A background thread sampling every worker every `interval_s` until stopped."""

    def __init__(self, worker_urls: dict[str, str], interval_s: float = 1.0):
        self.urls = dict(worker_urls)
        self.interval_s = interval_s
        self.samples: dict[str, list[Sample]] = {w: [] for w in self.urls}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvlab-scraper", daemon=True)

    def start(self) -> Scraper:
        if self.urls:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample_now(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            self._sample(client)

    def _loop(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                self._sample(client)
                self._stop.wait(self.interval_s)

    def _sample(self, client: httpx.Client) -> None:
        for worker, url in self.urls.items():
            try:
                self.samples[worker].append(read_worker(client, url))
            except (httpx.HTTPError, ValueError):
                self.errors += 1

    def window(self, start: float, end: float) -> WindowStats:
        """Counter deltas between the last sample at or before `start` and the first at or after `end`."""
        hits = queries = preempt = 0.0
        lag_p99 = lag_max = None
        for samples in self.samples.values():
            a, b = _at_or_before(samples, start), _at_or_after(samples, end)
            if a is None or b is None:
                continue
            hits += b.hits - a.hits
            queries += b.queries - a.queries
            preempt += b.preemptions - a.preemptions
            inside = [s for s in samples if start <= s.t <= end or s is b]
            lag_p99 = _worst(lag_p99, (s.lag_p99_s for s in inside))
            lag_max = _worst(lag_max, [b.lag_max_s])
        return WindowStats(hits / queries if queries > 0 else None, int(preempt), lag_p99, lag_max)

    def in_system(self, start: float, end: float) -> tuple[float | None, int]:
        """Mean requests in the system (running + waiting) over samples inside [start, end], summed
        over workers, and the fewest samples any worker gave; (None, 0) for servers without it."""
        total, fewest = 0.0, None
        for samples in self.samples.values():
            values = [s.in_system for s in samples if start <= s.t <= end and s.in_system is not None]
            if values:
                total += sum(values) / len(values)
                fewest = len(values) if fewest is None else min(fewest, len(values))
        return (total, fewest) if fewest else (None, 0)

    def time_scale(self) -> float | None:
        scales = [s.time_scale for samples in self.samples.values() for s in samples[-1:] if s.time_scale]
        return scales[0] if scales else None


def _at_or_before(samples: list[Sample], t: float) -> Sample | None:
    before = [s for s in samples if s.t <= t]
    return before[-1] if before else (samples[0] if samples else None)


def _at_or_after(samples: list[Sample], t: float) -> Sample | None:
    after = [s for s in samples if s.t >= t]
    return after[0] if after else (samples[-1] if samples else None)


def _worst(current: float | None, values) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return current
    return max(values) if current is None else max(current, *values)

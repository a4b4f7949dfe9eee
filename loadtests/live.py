"""One live measurement: open-loop stages against a URL, the workers polled alongside, stage by stage.

The stages run back to back in one Locust process (a staircase of rates): each stage's first
`warmup_s` lets queues and batches settle at the new rate and is not measured. After the last
measured stage the load stays on at the same rate (not measured) until every measured request has
finished, so the last rate is not flattered by an emptying cluster.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.analysis import Window, windows
from loadtests.locust_run import LocustRun, command
from loadtests.progress import Progress
from loadtests.scrape import Scraper, WindowStats

POLL_S = 1.0
SCRAPE_S = 0.5   # workers' /load: requests in the system twice a second, for the stationarity check


@dataclass
class LiveResult:
    header: dict
    records: list[dict]
    windows: list[Window]
    scraped: list[WindowStats | None]
    t0: float                                  # time.time() at the first scheduled send
    wall_s: float
    errors: list[str] = field(default_factory=list)
    locust_log: str = ""
    url: str = ""
    scraper: Scraper | None = None             # the workers' samples (requests in the system, lag)

    def missing(self, stage: int) -> int:
        """Requests of a stage with no record yet (still streaming, or lost when the run ended)."""
        planned = self.header.get("per_stage") or []
        recorded = sum(1 for r in self.records if r.get("stage") == stage)
        return max(0, planned[stage] - recorded) if stage < len(planned) else 0

    def unfinished(self, stage: int) -> int:
        """Requests of a stage cut short when the run ended, or never recorded at all."""
        return self.missing(stage) + sum(1 for r in self.records if r.get("stage") == stage and r.get("unfinished"))


@dataclass
class LivePlan:
    url: str
    worker_urls: dict[str, str]
    rates: list[float]
    warmup_s: float
    duration_s: float
    tail_s: float
    time_scale: float
    out: Path
    spec_path: str | None = None
    model: str | None = None
    seed: int = 0
    api: str = "chat"

    def stages(self) -> list[tuple[float, float]]:
        measured = [(r, self.warmup_s + self.duration_s) for r in self.rates]
        return measured + [(self.rates[-1], self.tail_s)]

    @property
    def measured_until(self) -> float:
        return len(self.rates) * (self.warmup_s + self.duration_s)


def measure(plan: LivePlan, on_stage: Callable[[int, LiveResult], None] | None = None,
            progress: Progress | None = None) -> LiveResult:
    stages = plan.stages()
    plan.out.mkdir(parents=True, exist_ok=True)
    records = plan.out / "records.jsonl"
    cmd = command(plan.url, stages, records=records, time_scale=plan.time_scale,
                  measured_until=plan.measured_until, spec=plan.spec_path, model=plan.model, seed=plan.seed,
                  csv_prefix=plan.out / "locust", run_time_s=sum(s for _, s in stages) + 120, api=plan.api)
    scraper = Scraper(plan.worker_urls, interval_s=SCRAPE_S).start()
    run = LocustRun(cmd, records, plan.out / "locust.log").start()
    started = time.monotonic()
    wins = windows(stages[:-1], plan.warmup_s)
    reported: set[int] = set()
    result = LiveResult({}, [], wins, [None] * len(wins), 0.0, 0.0)
    try:
        while run.running():
            time.sleep(POLL_S)
            _refresh(result, run, scraper)
            _report_done_stages(result, scraper, reported, on_stage)
            if progress is not None:
                progress.update(time.monotonic() - started, _status(result, stages))
    finally:
        code = run.stop()
        scraper.sample_now()
        scraper.stop()
    _refresh(result, run, scraper)
    result.wall_s = time.monotonic() - started
    result.locust_log = run.log_tail()
    result.scraper = scraper
    if code not in (0, None) or not result.header:
        result.errors.append(f"locust exited with code {code}:\n{result.locust_log}")
    for i in range(len(wins)):
        result.scraped[i] = _scrape(result, scraper, i)
    _report_done_stages(result, scraper, reported, on_stage, final=True)
    return result


def _refresh(result: LiveResult, run: LocustRun, scraper: Scraper) -> None:
    header, records = run.progress()
    if header:
        result.header, result.records, result.t0 = header, records, header["t0"]


def _scrape(result: LiveResult, scraper: Scraper, i: int) -> WindowStats | None:
    if not result.t0:
        return None
    w = result.windows[i]
    return scraper.window(result.t0 + w.start_s, result.t0 + w.end_s)


def _report_done_stages(result: LiveResult, scraper: Scraper, reported: set[int], on_stage, final=False) -> None:
    """Hand each stage to `on_stage`, in order, once all its requests have a record or one more stage
    has passed (long answers may stream for minutes; the final table has every request)."""
    per_stage = result.header.get("per_stage") or []
    elapsed = time.time() - result.t0 if result.t0 else 0.0
    for i in range(len(result.windows)):
        if i in reported or i >= len(per_stage):
            continue
        stage_s = result.windows[i].end_s - (result.windows[i - 1].end_s if i else 0.0)
        settled = result.missing(i) == 0 or elapsed > result.windows[i].end_s + stage_s
        if not final and not settled:
            break
        result.scraped[i] = _scrape(result, scraper, i)
        reported.add(i)
        if on_stage is not None:
            on_stage(i, result)


def _status(result: LiveResult, stages) -> str:
    if not result.header:
        return "starting Locust"
    elapsed = time.time() - result.t0
    ends = itertools.accumulate(length for _, length in stages)
    i = next((k for k, end in enumerate(ends) if elapsed < end), len(stages) - 1)   # the stage running now
    rate = stages[i][0]
    label = f"rate {rate:g}/s" if i < len(stages) - 1 else "draining at the last rate"
    done = len(result.records)
    return f"stage {min(i + 1, len(stages) - 1)}/{len(stages) - 1} {label}; {done} requests done"

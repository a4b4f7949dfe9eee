"""Step-time measurements from a live OpenAI-compatible endpoint (vLLM, SGLang, or a kvlab worker).

Crafted probes, each prompt a run of one token id (a fresh id per request, so no prefix-cache hits):
- single-sequence decode at several contexts: the median gap between streamed tokens is one decode
  step of batch 1 at that context (intercept and KV-read slope);
- concurrent decode batches: B streams at once, the median of their median gaps is a step of batch B
  (per-sequence cost);
- single long prefills: time to first token is one prefill step (GEMM and attention efficiency), less
  the HTTP round trip measured with a 16-token prompt (whose own step costs about a decode step). Every
read is bounded (tokens per stream, seconds per request); `time_scale` divides wall times for an
emulated endpoint that runs slower than real time.
"""
from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

from emulator.calibrate.measurements import StepRow

MAX_LINES = 100_000       # SSE lines read from one stream at most


class ProbeError(RuntimeError):
    pass


class Prober:
    def __init__(self, url: str, model: str, tp: int = 1, output_tokens: int = 24, timeout_s: float = 120.0,
                 time_scale: float = 1.0, first_token_id: int = 1000):
        self.url, self.model, self.tp = url.rstrip("/"), model, tp
        self.output = output_tokens
        self.timeout_s = timeout_s
        self.scale = time_scale
        self._next_id = first_token_id
        self._lock = threading.Lock()

    def _fresh_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def stream(self, prompt_tokens: int, max_tokens: int) -> list[float]:
        """Arrival times (s from sending, unscaled) of each streamed token chunk."""
        body = {"model": self.model, "prompt": [self._fresh_id()] * prompt_tokens, "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True, "temperature": 0}
        times: list[float] = []
        with httpx.Client(timeout=self.timeout_s) as client:
            start = time.perf_counter()
            with client.stream("POST", self.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise ProbeError(f"{self.url}: HTTP {r.status_code} for a {prompt_tokens}-token probe")
                for i, line in enumerate(r.iter_lines()):
                    if i > MAX_LINES:
                        raise ProbeError("stream longer than expected")
                    if line.startswith("data: {") and _has_text(line[6:]):
                        times.append((time.perf_counter() - start) / self.scale)
        if len(times) < 2:
            raise ProbeError(f"{self.url}: fewer than 2 streamed tokens")
        return times

    def decode_row(self, context: int, batch: int = 1) -> StepRow:
        gaps: list[float] = []
        errors: list[Exception] = []

        def one() -> None:
            try:
                t = self.stream(context, self.output)
                gaps.append(statistics.median(b - a for a, b in zip(t[1:], t[2:], strict=False)))
            except Exception as exc:   # reported below, after every stream ended
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout_s)
        if errors or not gaps:
            raise ProbeError(f"decode probe failed: {errors[:1]}")
        return StepRow(phase="decode", batch=batch, tokens=1, context=context + self.output // 2, tp=self.tp,
                       ms=statistics.median(gaps) * 1e3)

    def ttft(self, tokens: int, tries: int = 3) -> float:
        return statistics.median(self.stream(tokens, 2)[0] for _ in range(tries))

    def prefill_row(self, tokens: int, round_trip_s: float = 0.0) -> StepRow:
        ms = max(self.ttft(tokens) - round_trip_s, 1e-6) * 1e3
        return StepRow(phase="prefill", batch=1, tokens=tokens, context=0, tp=self.tp, ms=ms)

    def round_trip(self, step_s: float) -> float:
        """HTTP and queueing time in a TTFT: a 16-token prompt's TTFT less one short step (a 16-token
        prefill costs about what a batch-1 decode step does: both read every weight once)."""
        return max(self.ttft(16, tries=5) - step_s, 0.0)


def _has_text(payload: str) -> bool:
    try:
        choice = json.loads(payload)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return False
    return bool(choice.get("text"))


def probe(url: str, model: str, tp: int = 1, contexts=(256, 2048, 6144), batches=(4, 16),
          prefills=(512, 2048, 6144), batch_context: int = 512, **kw) -> list[StepRow]:
    """The probe set above, as step rows."""
    p = Prober(url, model, tp, **kw)
    rows = [p.decode_row(c) for c in contexts]
    rows += [p.decode_row(batch_context, b) for b in batches]
    round_trip = p.round_trip(rows[0].ms * 1e-3)
    rows += [p.prefill_row(n, round_trip) for n in prefills]
    return rows

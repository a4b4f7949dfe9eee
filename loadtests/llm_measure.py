"""The one LLM-specific measurement: send a streaming OpenAI request, time its tokens.

TTFT is the wall time from sending the request to the first content chunk; the inter-token latencies
(ITL) are the gaps between consecutive content chunks; e2e runs until the stream ends. Servers stream
one chunk per token (vLLM does, and kvlab by default), so chunks stand in for tokens; the server's usage
block, when it sends one, gives the exact token counts. A kvlab worker that coalesces tokens
(`stream_interval` > 1) names each token's emulated gap in its chunk (`token_gaps`): those gaps, times
the time scale, are the ITLs, so percentiles stay per token. Works against any OpenAI-compatible server.
"""
from __future__ import annotations

import http.client
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

_decode = msgspec.json.Decoder().decode
# What a broken exchange raises: httpx's errors, or a socket error / bad reply under loadtests.fast_http.
TRANSPORT_ERRORS = (httpx.HTTPError, OSError, http.client.HTTPException)


@dataclass
class StreamResult:
    """One request's timings in wall seconds (None where the stream never got that far)."""
    sent_at: float                 # time.time() when the request left: aligns with metrics scrapes
    status: int = 0                # HTTP status (0: no response at all)
    ttft_s: float | None = None
    e2e_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    chunks: int = 0                # tokens received (content chunks, or the tokens a coalesced chunk names)
    usage: dict[str, Any] | None = None
    error: str | None = None
    text: str = ""                 # the generated text (multi-turn users resend it)
    done: bool = False             # the stream ended normally (False: interrupted, or an error)
    time_scale: float = 1.0        # wall seconds per server second: turns stated token gaps into wall ones

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def output_tokens(self) -> int:
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return self.chunks

    @property
    def cached_tokens(self) -> int | None:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return details.get("cached_tokens")


def stream_request(client, path: str, payload: dict, headers: dict | None = None,
                   timeout: float | None = 600.0, result: StreamResult | None = None) -> StreamResult:
    """POST `payload` with stream=True to `path` and time every content chunk; never raises an HTTP error.
    `client`: an httpx.Client, or a loadtests.fast_http.FastClient (the load generator's).

    Pass `result` to keep the timings so far if the caller is interrupted mid-stream (the load test
    ends while long answers are still streaming: their TTFT and gaps still count).
    """
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    result = result or StreamResult(sent_at=time.time())
    result.sent_at = time.time()
    start = time.perf_counter()
    try:
        with client.stream("POST", path, json=body, headers=headers, timeout=timeout) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = _error_message(response.read(), response.status_code)
                return result
            _read_events(response, result, start)
    except TRANSPORT_ERRORS as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - start
    return result


def _sse_data(response: httpx.Response):
    """The `data:` payloads of an SSE stream, as bytes, each as soon as its line is complete.

    Splits raw bytes itself: at thousands of tokens a second the load generator's CPU is the limit,
    and httpx's text line iterator costs several times more per token than this.
    """
    pending = b""
    for chunk in response.iter_raw():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


def _read_events(response: httpx.Response, result: StreamResult, start: float) -> None:
    parts: list[str] = []
    last = None
    result.text = ""
    events = _sse_data(response)
    for data in events:
        if data == b"[DONE]":
            break
        event = _decode(data)
        if "error" in event:
            result.error = _error_text(event["error"])
            break
        if event.get("usage"):
            result.usage = event["usage"]
        text = _content(event)
        if not text:
            continue  # role-only first deltas and usage chunks carry no token
        now = time.perf_counter()
        stated = event.get("token_gaps")
        if last is None:
            result.ttft_s = now - start
        if stated:
            result.gaps_s += [g * result.time_scale for g in stated]
        elif last is not None:
            result.gaps_s.append(now - last)
        result.chunks += len(stated) + (last is None) if stated else 1
        last = now
        parts.append(text)
    for _ in events:   # read to the body's end: a connection left mid-body is closed, not reused
        pass
    result.text = "".join(parts)
    result.done = True
    if result.error is None and result.chunks == 0:
        result.error = "stream ended without any token"


def _content(event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if delta is not None:                   # chat completions
        return delta.get("content") or ""
    return choice.get("text") or ""         # completions


def _error_message(raw: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {_error_text(_decode(raw)['error'])}"
    except (msgspec.DecodeError, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200].decode(errors='replace')}"


def _error_text(error: Any) -> str:
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)


def fire_locust_events(events, result: StreamResult, name: str, per_gap: bool = True,
                       time_scale: float = 1.0) -> None:
    """Report one request as Locust metrics of their own: TTFT, ITL, E2E and TOKENS.

    Locust's table then shows TTFT and ITL percentiles beside e2e, in the server's milliseconds: wall
    times over `time_scale` (an emulated cluster's; 1 for a real server). The TOKENS row carries the output
    token count in its "response time" column (Locust has no unit-free metric). A failed request is
    one E2E failure, so rejections (429, 503) show in Locust's failure count.
    """
    ms = 1000 / time_scale
    if not result.ok:
        events.request.fire(request_type="E2E", name=name, response_time=(result.e2e_s or 0.0) * ms,
                            response_length=0, exception=RuntimeError(result.error or f"HTTP {result.status}"),
                            context={})
        return
    ttft_s, e2e_s = result.ttft_s, result.e2e_s
    assert ttft_s is not None and e2e_s is not None, "an ok stream had a token and an end"
    fire = events.request.fire
    fire(request_type="TTFT", name=name, response_time=ttft_s * ms, response_length=0,
         exception=None, context={})
    gaps = result.gaps_s if per_gap else _mean_gap(result)
    for gap in gaps:
        fire(request_type="ITL", name=name, response_time=gap * ms, response_length=0, exception=None,
             context={})
    fire(request_type="E2E", name=name, response_time=e2e_s * ms,
         response_length=result.output_tokens, exception=None, context={})
    fire(request_type="TOKENS", name=name, response_time=result.output_tokens,
         response_length=result.output_tokens, exception=None, context={})


def _mean_gap(result: StreamResult) -> list[float]:
    return [sum(result.gaps_s) / len(result.gaps_s)] if result.gaps_s else []


def record(result: StreamResult, **extra: Any) -> dict:
    """The raw per-request record the sweep analyses (wall seconds; JSON-ready)."""
    return {"sent_at": result.sent_at, "status": result.status, "ttft": result.ttft_s, "e2e": result.e2e_s,
            "gaps": [round(g, 6) for g in result.gaps_s], "tokens": result.output_tokens,
            "prompt_tokens": (result.usage or {}).get("prompt_tokens"), "cached_tokens": result.cached_tokens,
            "error": result.error, "unfinished": not result.done and result.error is None, **extra}

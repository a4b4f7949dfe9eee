"""The per-request SLO headers of the Gateway API Inference Extension: ``x-slo-ttft-ms`` (time to first
token) and ``x-slo-tpot-ms`` (time per output token), whole milliseconds of wall time.

Parsed strictly, before the body is read: ASCII digits only (no sign, no decimals, no spaces inside),
1 to MAX_MS; anything else is a one-line 400 naming the header. Only the slo_aware policy acts on them
(it refuses with 429 a request no worker is predicted to meet); other policies ignore them.
"""
from __future__ import annotations

from collections.abc import Mapping

import msgspec

from kvlab.wire.openai_api import ApiError

TTFT_HEADER = "x-slo-ttft-ms"
TPOT_HEADER = "x-slo-tpot-ms"
MAX_MS = 3_600_000    # an hour: beyond it an SLO means nothing to a router
_MAX_DIGITS = len(str(MAX_MS))


class SloTarget(msgspec.Struct, frozen=True):
    ttft_s: float | None = None   # wall seconds
    tpot_s: float | None = None


def parse_slo_headers(headers: Mapping[str, str]) -> SloTarget | None:
    """The request's SLO headers, or None when it sends neither; raises ApiError(400) on a bad value."""
    ttft, tpot = headers.get(TTFT_HEADER), headers.get(TPOT_HEADER)
    if ttft is None and tpot is None:
        return None
    return SloTarget(ttft_s=_millis(TTFT_HEADER, ttft), tpot_s=_millis(TPOT_HEADER, tpot))


def _millis(name: str, value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip()   # HTTP allows optional whitespace around a field value
    if not (0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_MS:
        raise ApiError(400, f"{name} must be a whole number of milliseconds from 1 to {MAX_MS}",
                       param=name, code="invalid_slo_header")
    return int(text) / 1000.0

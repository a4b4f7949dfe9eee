"""What a cluster costs: per hour from a price per GPU-hour, and per unit of work at the served rate."""
from __future__ import annotations

import msgspec

SECONDS_PER_HOUR = 3600.0


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    gpus: int
    per_hour: float
    per_million_output_tokens: float
    per_million_tokens: float          # prompt + output tokens
    per_thousand_requests: float


def cost(gpus: int, price_per_gpu_hour: float, rate: float, prompt_tokens: float, output_tokens: float) -> Cost:
    """Cost at `rate` requests/s actually served (the target, not the headroom the cluster holds)."""
    per_hour = float(gpus * price_per_gpu_hour)
    requests_per_hour = float(rate) * SECONDS_PER_HOUR
    prompt_tokens, output_tokens = float(prompt_tokens), float(output_tokens)
    return Cost(gpus=gpus, per_hour=per_hour,
                per_million_output_tokens=per_hour / (requests_per_hour * output_tokens) * 1e6,
                per_million_tokens=per_hour / (requests_per_hour * (prompt_tokens + output_tokens)) * 1e6,
                per_thousand_requests=per_hour / requests_per_hour * 1e3)

"""Workload requests (emulator.workload.Request) as OpenAI request bodies, and tenants as API keys.

Prompts keep their prefix structure in text form: requests that share a system prompt or a document
share the same leading text, so any server's prefix cache (kvlab's or vLLM's) sees the sharing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def path_for(api: str) -> str:
    if api not in ("chat", "completions"):
        raise ValueError(f"api must be 'chat' or 'completions' (got {api!r})")
    return CHAT_PATH if api == "chat" else COMPLETIONS_PATH


def body(request, model: str, api: str = "chat", ignore_eos: bool = True,
         messages: Sequence[dict[str, str]] | None = None) -> dict[str, Any]:
    """The request as a chat or completions body; `messages` overrides the request's own history."""
    out: dict[str, Any] = {"model": model, "max_tokens": int(request.max_tokens)}
    if ignore_eos:
        # vLLM's extension (kvlab honours it too): generate exactly max_tokens, so output lengths are
        # the workload's and not the model's whim; servers that do not know it ignore unknown fields.
        out["ignore_eos"] = True
    if api == "chat":
        out["messages"] = list(messages if messages is not None else request.messages or _as_user(request))
    else:
        out["prompt"] = request.text if request.text is not None else [int(t) for t in request.tokens]
    return out


def _as_user(request) -> list[dict[str, str]]:
    if request.text is None:
        raise ValueError(f"request {request.request_id} has no text; generate it with with_text=True")
    return [{"role": "user", "content": request.text}]


class TenantKeys:
    """Tenant name -> API key (the first of the tenant's keys in the spec), with a fallback key."""

    def __init__(self, keys: dict[str, str] | None = None, default: str | None = None):
        self.keys = dict(keys or {})
        self.default = default

    @classmethod
    def from_spec(cls, spec, default: str | None = None) -> TenantKeys:
        return cls({t.name: t.api_keys[0] for t in spec.tenants if t.api_keys}, default)

    def headers(self, tenant: str | None) -> dict[str, str]:
        key = self.keys.get(tenant or "", self.default)
        return {"Authorization": f"Bearer {key}"} if key else {}


def pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One name drawn by weight (tenants of a closed-loop user, archetypes of a mix)."""
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]

"""The settings a routing policy gets in a simulated run, and the prefix-key rule for trace replay.

`kvlab sim --trace` and `kvlab compare` both build their policies here, so one trace is keyed and routed
the same way by both commands.
"""
from __future__ import annotations

from collections.abc import Sequence

from emulator import traces
from emulator.spec import ClusterSpec
from router.policies.registry import build_policy

# Two trace blocks: every Mooncake request starts with the same 512-token block (the trace's common
# system prompt), so a ring keyed on fewer tokens sends the whole trace to one worker; keying on the
# common block and the conversation's first keeps a conversation's turns together, which reuse needs.
TRACE_KEY_BLOCKS = 2


def trace_prefix_blocks(block_size: int) -> int:
    """Engine blocks that key prefix routing when replaying a trace with its own (512-token) blocks."""
    return TRACE_KEY_BLOCKS * traces.TRACE_BLOCK_TOKENS // block_size


def policy_settings(spec: ClusterSpec, policy: str, *, trace: bool = False, prefix_blocks: int | None = None,
                    overrides: Sequence[str] = ()) -> dict:
    """The spec's router settings that `policy` takes, the prefix key (`prefix_blocks`, else the trace
    rule when replaying a trace, else the spec's), then POLICY.KEY=VALUE overrides."""
    candidates = dict(spec.router.settings)
    blocks = prefix_blocks or (trace_prefix_blocks(spec.engine.block_size) if trace else None)
    if blocks:
        candidates["prefix_blocks"] = blocks
    out = {k: v for k, v in candidates.items() if _accepts(policy, k, v)}
    for item in overrides:
        name, _, assignment = item.partition(".")
        key, _, value = assignment.partition("=")
        if name == policy:
            out[key] = _value(value)
    build_policy(policy, out)   # fail now, with the policy's own message, on a bad name or setting
    return out


def _accepts(policy: str, key: str, value) -> bool:
    try:
        build_policy(policy, {key: value})
        return True
    except ValueError:
        return False


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)

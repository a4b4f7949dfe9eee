"""One request's state inside the engine (what vLLM calls a Request / Sequence)."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import msgspec

from kvlab.wire.block_hash import BlockHash, block_hashes, root_hash

if TYPE_CHECKING:
    import numpy as np


class Status(enum.Enum):
    WAITING = "waiting"            # queued; holds no blocks
    WAITING_FOR_KV = "waiting_kv"  # blocks held, KV arriving over a link (decode role: remote; host tier: onboarding)
    RUNNING = "running"
    PREEMPTED = "preempted"        # evicted from the batch under memory pressure; resumes first
    HELD = "held"                  # prefill role: prompt done, KV held until a decode worker pulls it
    FINISHED = "finished"


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_probability: float = 0.0   # per-token chance of EOS after min_tokens (0: exactly max_tokens)


class RemotePrefill(msgspec.Struct, kw_only=True):
    """Decode role: the prompt was prefilled elsewhere; its KV and first token come over a link."""
    first_token: int


class Request:
    __slots__ = ("request_id", "prompt", "params", "arrival", "priority", "salt", "tokens",
                 "num_prompt", "num_computed", "block_ids", "hashes", "status", "remote",
                 "first_token_time", "finish_reason", "num_cached_prompt", "num_cached_blocks", "swapped",
                 "kv_ready_at", "preemptions", "num_onboarded", "loading_tokens")

    def __init__(self, request_id: str, prompt: list[int] | np.ndarray, params: SamplingParams, arrival: float,
                 priority: int = 0, salt: str | None = None, remote: RemotePrefill | None = None):
        self.request_id = request_id
        # A numpy prompt (simulator, traces) is hashed as is and kept as a list for token appends.
        hashes = block_hashes(prompt, salt=salt)
        prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt
        self.prompt = prompt
        self.params = params
        self.arrival = arrival
        self.priority = priority
        self.salt = salt
        self.tokens: list[int] = list(prompt)   # prompt then outputs
        self.num_prompt = len(prompt)
        self.num_computed = 0                  # tokens whose KV is in the cache
        self.block_ids: list[int] = []
        self.hashes: list[BlockHash] = hashes   # of full blocks, extended as tokens come
        self.status = Status.WAITING
        self.remote = remote
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.num_cached_prompt = 0             # prompt tokens served from the prefix cache
        self.num_cached_blocks = 0             # leading blocks already registered in the prefix cache
        self.swapped = False
        self.kv_ready_at: float | None = None  # when the remote or onboarded KV lands
        self.preemptions = 0
        self.num_onboarded = 0                 # prompt tokens onboarded from host memory (host tier)
        self.loading_tokens = 0                # host tier: tokens of KV the pending load copies back

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.num_prompt

    def extend_hashes(self, block_size: int) -> None:
        """Hash newly full blocks (outputs included) so they can be cached."""
        full = len(self.tokens) // block_size   # self.num_tokens, without the property call
        if full > len(self.hashes):
            parent = self.hashes[-1] if self.hashes else root_hash(self.salt)
            start = len(self.hashes) * block_size
            self.hashes.extend(block_hashes(self.tokens[start:full * block_size], block_size, parent=parent))

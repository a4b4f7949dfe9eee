"""Synthetic LLM workloads: arrival processes, request archetypes, seeded and pure.

Everything draws from streams of one seed, so the same arguments give the same requests, token for
token. Arrival gaps, archetype choices, tenants, lengths and words each have a stream of their own, drawn
in arrival order, so the requests do not depend on the rate or on how many are asked for: the same seed
at another rate gives the same requests at scaled times (agentic turns aside: which session a turn
continues depends on the think time), and a longer run extends a shorter one. Runs at several rates
therefore share their random numbers (common random numbers), and what differs between them is the
rate alone. Prompts are built from a fixed vocabulary of 4-letter words that the built-in tokenizer maps
to one distinct token each, so a request's token ids and its text agree exactly: prompts that share a
system prompt, a document or a session's history share the same leading token ids (and therefore the
same 16-token block hashes), and every unique part starts with a tag that makes it unique.

Archetypes (their length distributions are lognormal with the stated medians; shapes, not measurements
- calibrate them to your traffic):
  chat     shared system prompts + a short user turn, short-medium answers
  rag      a shared document of a few thousand tokens + a question, short answers
  code     a shared system prompt + a medium code context, longer answers
  agentic  multi-turn sessions that resend their growing history (tool results, previous answers)
"""
from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import xxhash

from kvlab.wire.tokenizer import BuiltinTokenizer

ARCHETYPES = ("chat", "rag", "code", "agentic")
VOCAB_WORDS = 4096   # 4096^3 = 6.9e10 distinct 3-word tags: unique for any workload we generate
TAG_WORDS = 3
_VOCAB_SEED = 20250101  # fixed: the vocabulary must never change between runs or machines


# -- length distributions --------------------------------------------------------------------------

class LogNormal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token counts: median x exp(sigma x N(0,1)), rounded and clipped to [low, high]."""
    median: float
    sigma: float = 0.5
    low: int = 1
    high: int = 32768

    def __post_init__(self):
        if self.median <= 0 or self.sigma < 0 or not 1 <= self.low <= self.high:
            raise ValueError(f"lognormal needs median > 0, sigma >= 0, 1 <= low <= high (got {self})")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = self.median * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64)

    @property
    def mean(self) -> float:
        """Mean of the unclipped lognormal: median x exp(sigma^2 / 2)."""
        return self.median * float(np.exp(self.sigma ** 2 / 2))


# -- archetypes -------------------------------------------------------------------------------------

class Archetype(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A single-turn request: one of `shared_count` shared prefixes, then a unique part."""
    name: str
    shared_count: int            # distinct shared prefixes (system prompts, documents)
    shared_len: LogNormal        # length of each shared prefix (drawn once per prefix)
    shared_per_request: int = 1  # prefixes concatenated per request (only the first is a common prefix)
    popularity: float = 1.0      # Zipf exponent over shared prefixes (0: uniform); hot prefixes are the norm
    unique_len: LogNormal        # the request's own part (user turn, question, code context)
    output_len: LogNormal        # max_tokens

    def __post_init__(self):
        if self.shared_count < 1 or self.shared_per_request < 1 or self.popularity < 0:
            raise ValueError("shared_count and shared_per_request must be >= 1, popularity >= 0")


class Agentic(Archetype, kw_only=True):
    """Sessions: each turn resends the whole history plus the last answer and a new tool result."""
    turns: LogNormal             # turns per session
    think_s: LogNormal           # seconds from one turn's arrival until the session may send the next


# Lengths are shapes chosen to resemble public workloads, not fits: chat outputs of a few hundred tokens
# (ShareGPT-style conversations; the Mooncake conversation trace's output p50 is 350), RAG chunks of a
# few thousand tokens, code generation with longer answers, agent loops with long tool-laden system
# prompts. The 8 chat system prompts match the router's prefix-routing test (issue 3).
DEFAULTS: dict[str, Archetype] = {
    "chat": Archetype(name="chat", shared_count=8, shared_len=LogNormal(median=600, sigma=0.4, high=4096),
                      unique_len=LogNormal(median=120, sigma=0.8, high=4096),
                      output_len=LogNormal(median=250, sigma=0.6, high=2048)),
    "rag": Archetype(name="rag", shared_count=16, shared_len=LogNormal(median=3000, sigma=0.3, high=8192),
                     unique_len=LogNormal(median=60, sigma=0.5, high=512),
                     output_len=LogNormal(median=150, sigma=0.5, high=1024)),
    "code": Archetype(name="code", shared_count=4, shared_len=LogNormal(median=300, sigma=0.3, high=2048),
                      unique_len=LogNormal(median=1500, sigma=0.7, high=16384),
                      output_len=LogNormal(median=500, sigma=0.6, high=4096)),
    # think_s median 8 s: a ~200-token answer at 20-40 ms per token plus a tool call of a few seconds.
    "agentic": Agentic(name="agentic", shared_count=4, shared_len=LogNormal(median=1500, sigma=0.3, high=8192),
                       unique_len=LogNormal(median=300, sigma=0.8, high=8192),
                       output_len=LogNormal(median=200, sigma=0.6, high=2048),
                       turns=LogNormal(median=6, sigma=0.5, high=32),
                       think_s=LogNormal(median=8, sigma=0.5, high=120)),
}


def make_archetype(name: str, overrides: dict[str, Any] | None = None) -> Archetype:
    """The named archetype with some parameters replaced (nested lengths merge field by field)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown archetype {name!r}; known: {', '.join(ARCHETYPES)}")
    base = msgspec.to_builtins(DEFAULTS[name])
    for key, value in (overrides or {}).items():
        merged = isinstance(value, dict) and isinstance(base.get(key), dict)
        base[key] = {**base[key], **value} if merged else value
    return msgspec.convert(base, type=type(DEFAULTS[name]))


# -- requests ---------------------------------------------------------------------------------------

class Request(msgspec.Struct, kw_only=True):
    request_id: str
    arrival_s: float
    tokens: np.ndarray             # prompt token ids, int32
    max_tokens: int
    archetype: str
    tenant: str = "default"
    session_id: str | None = None
    turn: int = 0                  # 0 for single-turn requests and a session's first turn
    shared_tokens: int | None = None  # leading tokens shared by design with other requests; None: unknown
    text: str | None = None        # the prompt as text (completions); encodes to exactly `tokens`
    messages: list[dict[str, str]] | None = None  # the prompt as chat messages, same prefix structure

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)


@functools.cache
def vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and texts (a (VOCAB_WORDS, 5) byte table) of words that are one distinct token each.

    Words are 4 lowercase letters with a leading space: the built-in tokenizer keeps such a piece whole,
    so a text of n words is exactly n tokens and texts concatenate as their tokens do.
    """
    rng = np.random.default_rng(_VOCAB_SEED)
    tok = BuiltinTokenizer()
    ids: dict[int, str] = {}
    while len(ids) < VOCAB_WORDS:
        word = " " + "".join(chr(97 + c) for c in rng.integers(0, 26, 4))
        (token,) = tok.encode(word)
        ids.setdefault(token, word)  # a hash collision keeps the first word: ids stay distinct
    # Every word is 5 ASCII characters, so texts are one fixed-width byte table: rendering is a gather.
    table = np.frombuffer("".join(ids.values()).encode("ascii"), dtype=np.uint8).reshape(-1, 5)
    return np.fromiter(ids, dtype=np.int32), table


def _text(words: np.ndarray) -> str:
    return vocabulary()[1][words].tobytes().decode("ascii")


def _tag(number: int) -> np.ndarray:
    """TAG_WORDS word indices spelling `number` in base VOCAB_WORDS: distinct numbers, distinct tags."""
    digits = [(number // VOCAB_WORDS ** k) % VOCAB_WORDS for k in range(TAG_WORDS)]
    return np.array(digits, dtype=np.int64)


def _unique(rng: np.random.Generator, length: int, number: int) -> np.ndarray:
    """A unique segment: its tag, then random words (length counts the tag, at least the tag)."""
    rest = rng.integers(0, VOCAB_WORDS, max(0, length - TAG_WORDS))
    return np.concatenate([_tag(number), rest])


def _seed_for(seed: int, name: str) -> np.random.SeedSequence:
    """A named stream of the seed (an archetype's own: its requests do not change when the mix adds
    another archetype)."""
    return np.random.SeedSequence([seed, xxhash.xxh32_intdigest(name.encode())])


class _Library:
    """The shared prefixes of one archetype: word arrays, a pure function of (seed, archetype, index)."""

    def __init__(self, arch: Archetype, seed: int):
        child = np.random.default_rng(_seed_for(seed, arch.name + "/shared"))
        lengths = arch.shared_len.sample(child, arch.shared_count)
        self.items = [child.integers(0, VOCAB_WORDS, n) for n in lengths]
        weights = 1.0 / np.arange(1, arch.shared_count + 1) ** arch.popularity
        self.p = weights / weights.sum()
        self.cdf = np.cumsum(self.p)
        self.cdf /= self.cdf[-1]

    def pick(self, rng: np.random.Generator, k: int) -> list[np.ndarray]:
        if k == 1:
            # what rng.choice(n, size=1, replace=False, p=p) draws (one uniform, searched in p's
            # normalized CDF), the same numbers without its per-call checks: a fifteenth of the time,
            # most of generating a long single-turn workload
            return [self.items[int(self.cdf.searchsorted(rng.random(1), side="right")[0])]]
        chosen = rng.choice(len(self.items), size=k, replace=k > len(self.items), p=self.p)
        return [self.items[i] for i in chosen]


# A prompt under construction: (chat role, word indices) segments.
Segments = list[tuple[str, np.ndarray]]


def _render(segments: Segments, with_text: bool) -> dict[str, Any]:
    words = np.concatenate([s for _, s in segments])
    out: dict[str, Any] = {"tokens": vocabulary()[0][words]}
    if with_text:
        out["text"] = _text(words)
        out["messages"] = [{"role": role, "content": _text(s)} for role, s in segments]
    return out


def _single_turn(arch: Archetype, library: _Library, rng: np.random.Generator, slots: Sequence[tuple[float, int]],
                 with_text: bool, seed: int) -> list[dict[str, Any]]:
    # the lengths come from streams of their own, so the n-th request is the same however many are drawn
    unique = arch.unique_len.sample(np.random.default_rng(_seed_for(seed, arch.name + "/unique")), len(slots))
    outputs = arch.output_len.sample(np.random.default_rng(_seed_for(seed, arch.name + "/outputs")), len(slots))
    requests = []
    for (t, number), n_unique, n_out in zip(slots, unique, outputs, strict=True):
        picked = library.pick(rng, arch.shared_per_request)
        segments = [("system", np.concatenate(picked)), ("user", _unique(rng, int(n_unique), number))]
        # Only the first shared part is surely a common prefix; later ones follow different firsts.
        requests.append(dict(arrival_s=t, max_tokens=int(n_out), slot=number, archetype=arch.name,
                             shared_tokens=len(picked[0]), **_render(segments, with_text)))
    return requests


class _Session(msgspec.Struct):
    id: str
    slot: int                      # the arrival that opened it: its tenant is the session's
    history: Segments
    turns_left: int
    turn: int = 0


def _agentic(arch: Agentic, library: _Library, rng: np.random.Generator, slots: Sequence[tuple[float, int]],
             with_text: bool) -> list[dict[str, Any]]:
    """Each arrival continues the session that has been ready longest, or opens a new one.

    So the request rate is exactly the arrival process's, and a session's next turn comes at least
    think_s after its previous one.
    """
    ready: list[tuple[float, int, _Session]] = []
    requests, opened = [], 0
    for t, number in slots:
        if ready and ready[0][0] <= t:
            session = heapq.heappop(ready)[2]
            session.history.append(("user", _unique(rng, int(arch.unique_len.sample(rng, 1)[0]), number)))
        else:
            session = _open_session(arch, library, rng, number, opened)
            opened += 1
        requests.append(_agentic_turn(arch, session, rng, t, with_text))
        if session.turns_left > 0:
            heapq.heappush(ready, (t + float(arch.think_s.sample(rng, 1)[0]), number, session))
    return requests


def _open_session(arch: Agentic, library: _Library, rng: np.random.Generator, number: int, index: int) -> _Session:
    shared = np.concatenate(library.pick(rng, arch.shared_per_request))
    task = _unique(rng, int(arch.unique_len.sample(rng, 1)[0]), number)
    turns = int(arch.turns.sample(rng, 1)[0])
    return _Session(id=f"{arch.name}-s{index:06d}", slot=number, history=[("system", shared), ("user", task)],
                    turns_left=turns)


def _agentic_turn(arch: Agentic, session: _Session, rng: np.random.Generator, t: float,
                  with_text: bool) -> dict[str, Any]:
    """Send the history, then append this turn's answer to it (the next turn resends it)."""
    n_out = int(arch.output_len.sample(rng, 1)[0])
    # Shared with an earlier request: the previous turn's whole prompt, or on turn 0 the system prompt.
    # (The previous answer is not: the engine generated its own tokens for it.)
    previous = session.history[:-2] if session.turn else session.history[:1]
    shared = sum(len(s) for _, s in previous)
    request = dict(arrival_s=t, max_tokens=n_out, slot=session.slot, archetype=arch.name,
                   session_id=session.id, turn=session.turn, shared_tokens=shared,
                   **_render(session.history, with_text))
    # The emulated answer is not known here; stand-in words of the requested length keep the
    # history growing as a real session's does (a live client may splice in the real answer).
    session.history.append(("assistant", rng.integers(0, VOCAB_WORDS, n_out)))
    session.turn += 1
    session.turns_left -= 1
    return request


# -- arrival processes ------------------------------------------------------------------------------

class RateProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A piecewise-constant arrival rate (requests/s): rates[i] holds from starts[i] to starts[i+1]."""
    starts: tuple[float, ...] = (0.0,)
    rates: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if len(self.starts) != len(self.rates) or not self.starts or self.starts[0] != 0.0:
            raise ValueError("a rate profile needs one rate per start, starting at 0")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)) or min(self.rates) < 0:
            raise ValueError("starts must increase and rates be >= 0")
        if self.rates[-1] <= 0:
            raise ValueError("the last rate must be > 0 (arrivals must not stop forever)")

    @classmethod
    def constant(cls, rate: float) -> RateProfile:
        return cls(starts=(0.0,), rates=(rate,))

    @classmethod
    def step(cls, base: float, factor: float, at_s: float) -> RateProfile:
        """`base` until `at_s`, then `factor` x base (a 2-3x step shows recovery time)."""
        return cls(starts=(0.0, at_s), rates=(base, base * factor))

    @classmethod
    def burst(cls, base: float, peak: float, start_s: float, length_s: float) -> RateProfile:
        return cls(starts=(0.0, start_s, start_s + length_s), rates=(base, peak, base))

    def rate_at(self, t: float) -> float:
        return self.rates[int(np.searchsorted(self.starts, t, side="right")) - 1]

    def _cumulative_at_starts(self) -> np.ndarray:
        spans = np.diff(self.starts) * np.asarray(self.rates[:-1])
        return np.concatenate([[0.0], np.cumsum(spans)])

    def expected(self, t: float) -> float:
        """Expected arrivals in [0, t]: the integrated rate."""
        i = int(np.searchsorted(self.starts, t, side="right")) - 1
        return float(self._cumulative_at_starts()[i] + (t - self.starts[i]) * self.rates[i])

    def warp(self, unit_times: np.ndarray) -> np.ndarray:
        """Map arrivals of a unit-rate process to this profile (time rescaling: t = Lambda^-1(s))."""
        cum = self._cumulative_at_starts()
        i = np.searchsorted(cum, unit_times, side="right") - 1  # zero-rate spans are skipped
        starts, rates = np.asarray(self.starts), np.asarray(self.rates)
        return starts[i] + (unit_times - cum[i]) / rates[i]


def unit_gaps(rng: np.random.Generator, n: int, cv: float = 1.0) -> np.ndarray:
    """Gaps of a renewal process with mean 1: exponential (Poisson) at cv=1, else gamma.

    Gamma with shape k = 1/cv^2 and scale 1/k has mean 1 and coefficient of variation cv;
    cv > 1 gives bursts, cv < 1 more regular arrivals than Poisson.
    """
    if cv <= 0:
        raise ValueError(f"cv must be > 0 (got {cv})")
    if cv == 1.0:
        return rng.exponential(1.0, n)
    shape = 1.0 / cv ** 2
    return rng.gamma(shape, 1.0 / shape, n)


def arrival_times(rng: np.random.Generator, rate: float | RateProfile, *, n: int | None = None,
                  duration_s: float | None = None, cv: float = 1.0) -> np.ndarray:
    """Arrival times (s) of `n` requests, or of all requests before `duration_s` (both: whichever first)."""
    if n is None and duration_s is None:
        raise ValueError("give n, duration_s or both")
    profile = rate if isinstance(rate, RateProfile) else RateProfile.constant(rate)
    if duration_s is None:
        assert n is not None   # checked above
        unit = np.cumsum(unit_gaps(rng, n, cv))
    else:
        unit = _unit_until(rng, profile.expected(duration_s), cv, n)
    times = profile.warp(unit)
    return times if duration_s is None else times[times < duration_s]


def _unit_until(rng: np.random.Generator, horizon: float, cv: float, cap: int | None) -> np.ndarray:
    """Unit-rate arrivals up to `horizon` (drawn in chunks; at most `cap` of them)."""
    chunk = int(horizon + 10 * np.sqrt(horizon + 1) * max(cv, 1.0)) + 16
    unit = np.cumsum(unit_gaps(rng, chunk, cv))
    while unit[-1] < horizon and (cap is None or len(unit) < cap):
        unit = np.concatenate([unit, unit[-1] + np.cumsum(unit_gaps(rng, chunk, cv))])
    unit = unit[unit < horizon]
    return unit if cap is None else unit[:cap]


# -- putting it together ----------------------------------------------------------------------------

def generate(rate: float | RateProfile, *, num_requests: int | None = None, duration_s: float | None = None,
             mix: dict[str, float] | None = None, params: dict[str, dict[str, Any]] | None = None,
             tenants: dict[str, float] | None = None, arrival: str = "poisson", cv: float = 1.0,
             seed: int = 0, with_text: bool = False) -> list[Request]:
    """Requests in arrival order. `rate` is requests/s (agentic turns count as requests).

    mix: archetype -> weight (default all chat); params: archetype -> parameter overrides;
    tenants: tenant -> weight (default one tenant "default"); arrival "poisson" or "gamma" with `cv`.
    """
    rng = np.random.default_rng(seed)
    times = arrival_times(rng, rate, n=num_requests, duration_s=duration_s, cv=1.0 if arrival == "poisson" else cv)
    # streams of their own: drawn after the arrival gaps, they would shift with how many gaps were drawn
    kinds = _draw(np.random.default_rng(_seed_for(seed, "/archetypes")), mix or {"chat": 1.0}, len(times))
    owners = _draw(np.random.default_rng(_seed_for(seed, "/tenants")), tenants or {"default": 1.0}, len(times))
    built: list[dict[str, Any]] = []
    for name in sorted(set(kinds)):
        arch = make_archetype(name, (params or {}).get(name))
        slots = [(float(times[i]), int(i)) for i in np.flatnonzero(kinds == name)]
        built += _build(arch, seed, slots, with_text)
    built.sort(key=lambda r: (r["arrival_s"], r["slot"]))
    requests = []
    for i, fields in enumerate(built):
        tenant = str(owners[fields.pop("slot")])  # a session keeps the tenant of the arrival that opened it
        requests.append(Request(request_id=f"req-{seed}-{i:07d}", tenant=tenant, **fields))
    return requests


def _draw(rng: np.random.Generator, weights: dict[str, float], n: int) -> np.ndarray:
    names = list(weights)
    p = np.asarray([weights[k] for k in names], dtype=float)
    if len(names) == 0 or p.min() < 0 or p.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum (got {weights})")
    return np.asarray(names)[rng.choice(len(names), size=n, p=p / p.sum())]


def _build(arch: Archetype, seed: int, slots: list[tuple[float, int]], with_text: bool) -> list[dict[str, Any]]:
    library = _Library(arch, seed)
    rng = np.random.default_rng(_seed_for(seed, arch.name))
    if isinstance(arch, Agentic):
        return _agentic(arch, library, rng, slots, with_text)
    return _single_turn(arch, library, rng, slots, with_text, seed)


def from_spec(spec: Any, rate: float | RateProfile | None = None, *, num_requests: int | None = None,
              duration_s: float | None = None, with_text: bool = False) -> list[Request]:
    """Requests for a ClusterSpec's [workload] defaults (the first listed rate unless `rate` is given)."""
    w = spec.workload
    if rate is None:
        if not w.rates:
            raise ValueError("the spec's workload lists no rates; pass rate=")
        rate = w.rates[0]
    tenants = w.tenants or ({spec.tenants[0].name: 1.0} if spec.tenants else None)
    if num_requests is None and duration_s is None:
        if w.num_requests:
            num_requests = w.num_requests
        else:
            duration_s = w.duration_s
    return generate(rate, num_requests=num_requests, duration_s=duration_s, mix=w.mix, params=w.params,
                    tenants=tenants, arrival=w.arrival, cv=w.cv, seed=w.seed, with_text=with_text)

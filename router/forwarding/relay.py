"""The client's one stream, assembled from upstream events across retries and migrations.

While the first worker serves the request its events go to the client byte for byte. Events from
any later source (a migration target, a P/D decode worker) are rebuilt under the first response's
id, creation time and model and in the client's format (chat chunks from a completions stream), with
usage corrected to the client's prompt and every token the client received. The relay also records
the generated token ids, which a migration appends to the prompt.

Counting output tokens costs nothing when the upstream says how many there are: its ``token_ids``
(vLLM's return_token_ids, kvlab workers) are kept as they come, and its ``usage`` gives the count.
Text from an upstream that sends no ids is encoded to ids only when they are needed (a migration, or a
stream that ended without usage), never per chunk where a usage report is on its way: on the first
source, whose events go to the client byte for byte, when the client asked for usage
(``stream_options.include_usage``, which the router also asks of the upstream for every stream: see
router.frontdoor.intake) or the chunks carry usage.
"""
from __future__ import annotations

import msgspec

from kvlab.wire.openai_api import SSE_DONE, ApiError, chat_chunk, completion_chunk, sse, sse_error, usage, usage_chunk
from router.forwarding.sse import DONE, Chunk, Usage, data_of, decode_chunk
from router.frontdoor.job import Job
from router.frontdoor.tokenize import PromptTokenizer


class BadEvent(Exception):
    """An upstream event the router cannot read, or an error event: the source has failed."""


class StreamRelay:
    def __init__(self, job: Job, tokenizer: PromptTokenizer):
        self.job = job
        self.tokenizer = tokenizer
        self._ids: list[int] = []       # output token ids known so far
        self._pending: list[str] = []   # text pieces after them, not yet encoded (see the module doc)
        self._reported: int | None = None   # completion tokens the first source's usage reported
        self.rid = ""
        self.created = 0
        self.model = job.model
        self.finish_reason: str | None = None
        self.done = False               # [DONE] has been produced
        self.cached_tokens = 0          # reported by the first source that sent usage
        self.role_sent = False          # chat: the assistant role went out in some delta
        self.gaps: list[float] = []     # emulated gaps of coalesced tokens not yet timed (take_gaps)
        # Fixed once the job reaches the relay (router.frontdoor.intake set its fields): read per event
        self._include_usage = job.include_usage
        self._upstream_usage = job.upstream_usage
        self._chat = job.endpoint == "chat"

    @property
    def started(self) -> bool:
        """Some event reached the client, so a failure now needs a migration, not a plain retry."""
        return bool(self.rid)

    @property
    def generated(self) -> list[int]:
        """Every output token id so far (encodes the text still pending, once)."""
        if self._pending:
            self._encode_pending()
        return self._ids

    def _encode_pending(self) -> None:
        for piece in self._pending:
            self._ids += self.tokenizer.output_ids(piece)
        self._pending = []

    @property
    def completion_tokens(self) -> int:
        """Output tokens so far: as the upstream reported them where it did, else counted from ids."""
        if self._pending and self._reported is not None:
            return self._reported
        return len(self.generated)

    @property
    def streamed(self) -> int:
        """Tokens the client has received, for TTFT/ITL: exact where ids are known; a text piece
        awaiting its usage count counts as one token (an upstream streams a token per chunk)."""
        return len(self._ids) + len(self._pending)

    @property
    def remaining(self) -> int:
        return self.job.max_tokens - len(self.generated)

    def take(self, events: list[bytes], rewrite: bool, out: list[bytes]) -> None:
        """Record what `events` (those that arrived together) carried and append the bytes for the
        client to `out`, up to [DONE]. Raises BadEvent; `out` then holds what the events before it gave.

        One loop for a read's events, with the first source's plain token event (nearly every event)
        handled inline: a call per event was most of what relaying one cost."""
        for event in events:
            data: bytes | None
            if event.startswith(b"data:") and (end := event.find(b"\n")) >= 0:   # its first line is the data
                data = event[5:end].strip()
            else:
                data = data_of(event)
                if data is None:
                    continue           # a comment or keep-alive
            if data == DONE:
                self.done = True
                out.append(SSE_DONE)
                return
            try:
                chunk = decode_chunk(data)
            except msgspec.MsgspecError as exc:
                raise BadEvent(f"unreadable event: {exc}") from None
            if chunk.error is not None:
                raise BadEvent(f"error event: {chunk.error.get('message', chunk.error)}")
            if not self.rid:
                self.rid, self.created = chunk.id, chunk.created or self.created
            if rewrite:
                text = self._record(chunk, False)
                self._gaps_and_usage(chunk, True)
                if (rebuilt := self._rebuilt(chunk, text)) is not None:
                    out.append(rebuilt)
                continue
            self._record(chunk, self._upstream_usage or chunk.usage is not None)
            if chunk.token_gaps or chunk.usage is not None:
                self._gaps_and_usage(chunk, False)
                if not chunk.choices and chunk.usage is not None and not self._include_usage:
                    continue   # usage the router asked for itself (router.frontdoor.intake)
            if self._chat:
                self.role_sent = True   # the worker's first chat chunk carries the role
            out.append(event)

    def accept(self, event: bytes, rewrite: bool) -> bytes | None:
        """Bytes for the client from one event (None: nothing), after recording what it carried."""
        out: list[bytes] = []
        self.take([event], rewrite, out)
        return b"".join(out) or None

    def take_gaps(self) -> list[float]:
        """The per-token gaps that upstream chunks carried since the last call."""
        gaps, self.gaps = self.gaps, []
        return gaps

    def _gaps_and_usage(self, chunk: Chunk, rewrite: bool) -> None:
        if chunk.token_gaps:
            self.gaps += chunk.token_gaps
        if chunk.usage is not None:
            if not self.cached_tokens:
                self.cached_tokens = chunk.usage.cached_tokens
            if not rewrite:
                self._reported = chunk.usage.completion_tokens
                self.job.reported_prompt_tokens = chunk.usage.prompt_tokens   # the first attempt's own prompt

    def _record(self, chunk: Chunk, defer: bool) -> str:
        """The chunk's text, after recording its token ids (or its text, to be counted or encoded)."""
        text = ""
        for choice in chunk.choices:
            # a completion's text or a chat delta's content (read here, not in a method: once per event)
            piece = choice.text if choice.text is not None else \
                (choice.delta.content or "") if choice.delta is not None else ""
            text += piece
            if choice.token_ids is not None:
                if self._pending:
                    self._encode_pending()   # the ids go after the pending text's: the order is kept
                self._ids += choice.token_ids
            elif piece:
                if defer:
                    self._pending.append(piece)   # counted by the usage to come, encoded only if needed
                else:
                    self._ids += self.tokenizer.output_ids(piece)   # a server that streams no token ids
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        return text

    def _rebuilt(self, chunk: Chunk, text: str) -> bytes | None:
        out = b""
        if chunk.choices and (text or chunk.choices[0].finish_reason):
            out += self.content(text, chunk.choices[0].finish_reason, chunk.token_gaps)
        if chunk.usage is not None:
            out += self.usage_event(chunk.usage)
        return out or None

    # -- events the router writes itself ---------------------------------------------------------
    def content(self, text: str, finish_reason: str | None, token_gaps: list[float] | None = None) -> bytes:
        if self._chat:
            delta = {"content": text}
            if not self.role_sent:
                delta = {"role": "assistant", "content": text}
                self.role_sent = True
            payload = chat_chunk(self.rid, self.model, self.created, delta, finish_reason)
        else:
            payload = completion_chunk(self.rid, self.model, self.created, text, finish_reason)
        if token_gaps:
            payload["token_gaps"] = token_gaps
        return sse(payload)

    def usage_event(self, upstream: Usage | None = None) -> bytes:
        if not self.job.include_usage:
            return b""
        # A migrated stream's usage came from a continuation (prompt + tokens before it): count the prompt here.
        job = self.job
        prompt = job.reported_prompt_tokens if job.reported_prompt_tokens is not None else len(job.prompt)
        cached = min(self.cached_tokens, prompt)
        obj = "chat.completion.chunk" if job.endpoint == "chat" else "text_completion"
        body = usage(prompt, self.completion_tokens, cached)
        return sse(usage_chunk(self.rid, self.model, self.created, obj, body))

    def finish_done(self) -> bytes:
        """The worker sent its last token and finish reason but closed before [DONE]."""
        self.done = True
        return SSE_DONE

    def finish(self, reason: str) -> bytes:
        """End a stream the router completes itself (the budget ran out as the worker died)."""
        self.done = True
        self.finish_reason = reason
        return self.content("", reason) + self.usage_event() + SSE_DONE

    def error(self, err: ApiError) -> bytes:
        """End an unrecoverable stream: an OpenAI error event, then [DONE] so clients stop reading."""
        self.done = True
        return sse_error(err) + SSE_DONE

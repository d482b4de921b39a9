"""Stream accounting: vLLM's running usage tallied per choice and per prompt, and the chunks the client gets.

The gateway always asks vLLM for `stream_options: {include_usage, continuous_usage_stats}`. With those,
every chunk carries usage, but for ITS choice only: `completion_tokens` counts that choice's tokens so far
and `prompt_tokens` that choice's prompt. Only the final usage chunk (`choices: []`) has the request's
totals. A stream that never reaches it (client gone, upstream dead) is billed from the tally: the sum of
the latest count of every choice, and every prompt once. vLLM prefills and counts a prompt once per
choice (n > 1); usage counts it once; the difference is the fan-out, counted apart.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson

from gateway.record import RequestRecord

log = logging.getLogger("gateway.streaming")

DONE = b"data: [DONE]\n\n"
MAX_TOKENS_PLAUSIBLE = 2**31  # no context window comes near; larger counts are a broken upstream


def sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk_has_token(choices: list[Any]) -> bool:
    for c in choices:
        if not isinstance(c, dict):
            continue
        if c.get("text"):
            return True
        delta = c.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")
                                        or delta.get("reasoning_content") or delta.get("reasoning")):
            return True
    return False


class AbsurdUsage(ValueError):
    pass


class MalformedStream(Exception):
    pass


def _int(v: Any) -> int:
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_TOKENS_PLAUSIBLE:
        raise AbsurdUsage(f"token count {v!r}")
    return v


def _cached(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details")
    return _int(details.get("cached_tokens")) if isinstance(details, dict) else 0


class UsageTally:
    """What vLLM did for one upstream request, from its usage: totals when the final chunk came, else per choice.

    `n` is the number of choices per prompt (choice index i belongs to prompt i // n, as vLLM numbers them).
    A choice counts toward vLLM's prefill work once a chunk of it arrived (vLLM sends a choice's first
    chunk after its prefill, and counts the prompt then).
    """

    __slots__ = ("n", "_completion", "_prompt", "_cached", "_completion_sum", "final", "invalid")

    def __init__(self, n: int = 1) -> None:
        self.n = max(1, n)
        self._completion: dict[int, int] = {}
        self._prompt: dict[int, int] = {}  # prompt index -> its tokens
        self._cached: dict[int, int] = {}
        self._completion_sum = 0
        self.final: tuple[int, int, int] | None = None  # (prompt, completion, cached) of the final usage chunk
        self.invalid = False

    def add(self, usage: dict[str, Any], choices: Any) -> None:
        """One chunk's usage; `choices` is the chunk's choice list (empty for the final usage chunk)."""
        if self.invalid:
            return
        try:
            prompt, completion, cached = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), \
                _cached(usage)
        except AbsurdUsage:
            self.invalid = True
            raise
        if not choices:
            self.final = (prompt, completion, cached)
            return
        if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
            idx = choices[0].get("index", 0)
            idx = idx if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < 1 << 20 else 0
        else:  # not how vLLM sends continuous usage: take it as a snapshot of the whole request
            self.final = (prompt, completion, cached)
            return
        before = self._completion.get(idx, 0)
        if completion > before:
            self._completion[idx] = completion
            self._completion_sum += completion - before
        elif idx not in self._completion:
            self._completion[idx] = before
        p = idx // self.n
        self._prompt[p] = prompt
        if cached:
            self._cached[p] = max(cached, self._cached.get(p, 0))

    def add_body(self, usage: dict[str, Any]) -> None:
        """A non-streaming response's usage (always the totals)."""
        self.add(usage, None)

    @property
    def reported(self) -> bool:
        return not self.invalid and (self.final is not None or bool(self._prompt))

    @property
    def prompt(self) -> int:
        """Prompt tokens as usage bills them: each prompt once."""
        if self.final is not None:
            return self.final[0]
        return sum(self._prompt[p] for p in self._started_prompts())

    @property
    def completion(self) -> int:
        return self.final[1] if self.final is not None else self._completion_sum

    @property
    def cached(self) -> int:
        if self.final is not None:
            return self.final[2]
        return sum(self._cached.get(p, 0) for p in self._started_prompts())

    @property
    def fanout_prompt(self) -> int:
        """Prompt tokens vLLM prefilled beyond the billed ones: once more per extra choice of a prompt."""
        if self.n == 1:
            return 0
        if self.final is not None and not self._prompt:  # non-stream (or totals only): every choice ran
            return (self.n - 1) * self.final[0]
        extra = 0
        for p in self._started_prompts():
            choices = self.n if self.final is not None else sum(1 for i in self._completion if i // self.n == p)
            extra += max(0, choices - 1) * self._prompt[p]
        return extra

    def _started_prompts(self) -> list[int]:
        """Prompts vLLM prefilled. vLLM streams a choice's first chunk (with its usage) only once that
        choice produced output, which is when vLLM counts its prompt."""
        return list(self._prompt)

    def write(self, rec: RequestRecord) -> None:
        """Copy the figures into the record (the request's own, billed usage)."""
        if self.invalid:
            if not rec.usage.usage_invalid:
                log.warning("request %s: upstream usage not believed", rec.identity.request_id)
            u = rec.usage
            u.usage_invalid, u.usage_reported = True, False
            u.prompt_tokens = u.completion_tokens = u.cached_tokens = u.fanout_prompt_tokens = 0
            return
        if not self.reported:
            return
        u = rec.usage
        u.usage_reported = True
        u.prompt_tokens, u.completion_tokens, u.cached_tokens = self.prompt, self.completion, self.cached
        u.fanout_prompt_tokens = self.fanout_prompt


def tally_body(body: Any, n: int) -> UsageTally:
    """The usage of a non-streaming response (chat, completion or embedding)."""
    tally = UsageTally(n)
    if isinstance(body, dict) and isinstance(body.get("usage"), dict):
        with contextlib.suppress(AbsurdUsage):
            tally.add_body(body["usage"])
    return tally


class StreamAccountant:
    """Reads each upstream chunk once, tallies usage, marks token times, and returns the bytes to relay (or None)."""

    __slots__ = ("rec", "tally", "want_usage", "want_continuous", "last_token_at",
                 "upstream_error")

    finished = False  # chat and completions end with `data: [DONE]`, which the relay reads itself
    end_marker = DONE

    def __init__(self, rec: RequestRecord, want_usage: bool, want_continuous: bool, n: int = 1) -> None:
        self.rec = rec
        self.tally = UsageTally(n)
        self.want_usage = want_usage
        self.want_continuous = want_continuous
        self.last_token_at: float | None = None
        self.upstream_error: dict[str, Any] | None = None

    def on_data(self, payload: bytes) -> bytes | None:
        now = time.perf_counter()
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise MalformedStream("upstream sent a chunk that is not JSON") from None
        if not isinstance(obj, dict):
            raise MalformedStream("upstream sent a chunk that is not a JSON object")
        if "error" in obj and "choices" not in obj:
            err = obj["error"]
            self.upstream_error = err if isinstance(err, dict) else {"message": str(err)}
            return b"data: " + payload + b"\n\n"
        usage = obj.get("usage")
        choices = obj.get("choices")
        if isinstance(usage, dict):
            try:
                self.tally.add(usage, choices)
            except AbsurdUsage as e:
                log.warning("request %s: upstream usage not believed (%s)", self.rec.identity.request_id, e)
        if choices:
            if isinstance(choices, list) and chunk_has_token(choices):
                self.rec.mark_first_token(now)
                self.last_token_at = now
            if usage is not None and not self.want_continuous:
                del obj["usage"]
                return sse_data(obj)
            return b"data: " + payload + b"\n\n"
        if usage is not None:  # the final usage-only chunk (choices: [])
            return b"data: " + payload + b"\n\n" if self.want_usage else None
        return b"data: " + payload + b"\n\n"

    def done(self) -> None:
        """The stream ended (in any way): the record gets the tallied usage and the time per output token."""
        self.tally.write(self.rec)
        if self.last_token_at is not None:
            self.rec.mark_tokens_done(self.last_token_at)

    def error_event(self, err: Any) -> bytes:
        """How a failure the gateway detected mid-stream is told to the client: an OpenAI error chunk."""
        return sse_data(err.body())


class RecordingAccountant(StreamAccountant):
    """The stream accountant that also keeps each upstream payload, for storing a complete stream.

    It stops keeping them (and frees what it kept) once they pass `max_bytes`: such a stream could
    not be stored anyway, and a long one would otherwise sit in memory whole until it ends.
    """

    __slots__ = ("payloads", "_left")

    def __init__(self, rec: RequestRecord, want_usage: bool, want_continuous: bool, n: int = 1,
                 max_bytes: int = 1 << 62) -> None:
        super().__init__(rec, want_usage, want_continuous, n)
        self.payloads: list[bytes] | None = []
        self._left = max_bytes

    def on_data(self, payload: bytes) -> bytes | None:
        if self.payloads is not None:
            self._left -= len(payload) + 1  # + the newline that joins them in the entry
            if self._left >= -1:
                self.payloads.append(payload)
            else:
                self.payloads = None
        return super().on_data(payload)

    def recorded(self) -> bytes | None:
        """The entry body (payloads, one a line), or None when the stream outgrew max_bytes."""
        return None if self.payloads is None else b"\n".join(self.payloads)


async def replay(payloads: list[bytes], acct: Any, on_done: Callable[[], bytes]) -> AsyncGenerator[bytes, None]:
    """A cache hit answered as the original stream: the same chunks through the accountant, trailer, end marker."""
    for payload in payloads:
        out = acct.on_data(payload)
        if out is not None:
            yield out
    acct.done()
    yield on_done() + acct.end_marker

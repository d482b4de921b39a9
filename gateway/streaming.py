"""Server-sent events: read vLLM's stream chunk by chunk, account it, and write what the client asked for.

The gateway always asks vLLM for `stream_options: {include_usage, continuous_usage_stats}` so that
every chunk carries the cumulative usage: the record is exact even when the client disconnects
midway. Usage the client did not ask for is removed from the chunks it receives.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from gateway.record import RequestRecord

log = logging.getLogger("gateway.streaming")

DONE = b"data: [DONE]\n\n"


def sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_comment(text: bytes) -> bytes:
    """A comment line: SSE clients (the openai SDK included) ignore it."""
    return b": " + text + b"\n\n"


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


class StreamAccountant:
    """Reads each upstream chunk once, updates the record, and returns the bytes to relay (or None)."""

    __slots__ = ("rec", "want_usage", "want_continuous", "last_token_at", "saw_usage_chunk", "upstream_error")

    finished = False  # chat and completions end with `data: [DONE]`, which the relay reads itself
    end_marker = DONE

    def __init__(self, rec: RequestRecord, want_usage: bool, want_continuous: bool) -> None:
        self.rec = rec
        self.want_usage = want_usage
        self.want_continuous = want_continuous
        self.last_token_at: float | None = None
        self.saw_usage_chunk = False
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
        if isinstance(usage, dict):
            apply_usage(self.rec, usage)
        choices = obj.get("choices")
        if choices:
            if isinstance(choices, list) and chunk_has_token(choices):
                self.rec.mark_first_token(now)
                self.last_token_at = now
            if usage is not None and not self.want_continuous:
                del obj["usage"]
                return sse_data(obj)
            return b"data: " + payload + b"\n\n"
        if usage is not None:  # the final usage-only chunk (choices: [])
            self.saw_usage_chunk = True
            return b"data: " + payload + b"\n\n" if self.want_usage else None
        return b"data: " + payload + b"\n\n"

    def done(self) -> None:
        if self.last_token_at is not None:
            self.rec.mark_tokens_done(self.last_token_at)

    def error_event(self, err: Any) -> bytes:
        """How a gateway-detected failure is told to the client: an OpenAI error chunk."""
        return sse_data(err.body())


class MalformedStream(Exception):
    pass


MAX_TOKENS_PLAUSIBLE = 2**31  # no context window comes near; larger counts are a broken upstream


class AbsurdUsage(ValueError):
    pass


def _int(v: Any) -> int:
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_TOKENS_PLAUSIBLE:
        raise AbsurdUsage(f"token count {v!r}")
    return v


def take_usage(rec: RequestRecord, body: Any) -> None:
    """Usage of a non-streaming response (chat, completion or embedding)."""
    if isinstance(body, dict) and isinstance(body.get("usage"), dict):
        apply_usage(rec, body["usage"])


def apply_usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
    """Copy vLLM's usage (cumulative, so the latest chunk's figures win) into the record.

    Counts that are negative, not integers or absurdly large are not believed: the record says the
    usage was not reported (and is billed nothing) rather than carry invented figures.
    """
    try:
        details = usage.get("prompt_tokens_details")
        figures = (_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")),
                   _int(details.get("cached_tokens")) if isinstance(details, dict) else 0)
    except AbsurdUsage as e:
        if not rec.usage_invalid:
            log.warning("request %s: upstream usage not believed (%s)", rec.request_id, e)
        rec.usage_invalid = True
        rec.usage_reported = False
        return
    if rec.usage_invalid:
        return
    rec.usage_reported = True
    rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens = figures

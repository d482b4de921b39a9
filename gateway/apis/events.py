"""Stream accounting for APIs whose SSE events are named (`event: <type>`): Responses and Anthropic Messages.

vLLM writes each such event as `event: <type>` + `data: {"type": "<type>", ...}`: the name is always
the payload's own `type`, so the relay can keep reading `data:` lines only and the accountant writes
the `event:` line back from the payload it parsed once (the anthropic SDK dispatches on it). Neither
API ends with `data: [DONE]`: the stream is complete when its terminal event arrived.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.relay import FirstChunkError
from gateway.streaming import AbsurdUsage, MalformedStream, UsageTally

log = logging.getLogger("gateway.apis")

_EVENT_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")  # never lets an upstream smuggle extra SSE lines


class EventAccountant:
    """Reads each upstream event once, tallies usage, and returns the SSE bytes to relay.

    Subclasses say which events carry usage, which end the stream, which carry generated text, and
    how this API writes an error event. Usage goes into a UsageTally like chat's: the final usage
    when it came, else a running count (the prompt as far as known, the output deltas so far).
    """

    __slots__ = ("rec", "tally", "upstream_error", "finished", "last_token_at", "deltas", "prompt", "cached",
                 "payloads", "prompt_known", "max_bytes", "_kept")

    TERMINAL: frozenset[str] = frozenset()
    end_marker = b""  # neither API has a [DONE] line

    def __init__(self, rec: RequestRecord, keep_payloads: bool = False, max_bytes: int = 1 << 62) -> None:
        self.rec = rec
        self.tally = UsageTally(1)
        self.upstream_error: dict[str, Any] | None = None
        self.finished = False  # the terminal event arrived: the stream is complete
        self.last_token_at: float | None = None
        self.deltas = 0  # events that carried generated output (one per engine step that produced text)
        self.prompt: Any = 0  # prompt tokens as far as an event told them (Messages: message_start)
        self.cached: Any = 0
        self.payloads: list[bytes] | None = [] if keep_payloads else None
        self.max_bytes = max_bytes  # a recording for the cache stops past this (cache.max_entry_bytes)
        self._kept = 0
        self.prompt_known = False  # an event reported the prompt count (Messages: message_start)

    def on_data(self, payload: bytes) -> bytes | None:
        now = time.perf_counter()
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise MalformedStream("upstream sent an event that is not JSON") from None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str) or not _EVENT_NAME.fullmatch(kind):
            raise MalformedStream("upstream sent an event without a valid type")
        if self.payloads is not None:
            self._kept += len(payload) + 1
            if self._kept > self.max_bytes:
                self.payloads = None  # too large to be stored: keep nothing more (memory stays bounded)
            else:
                self.payloads.append(payload)
        if self.is_output(kind, obj):
            self.deltas += 1
            self.rec.mark_first_token(now)
            self.last_token_at = now
            # Lower bound until the final usage: vLLM sends one delta per engine step that produced text
            # (one token per step at its default stream interval); tokens without text yet are not seen.
            self.add_usage({"prompt_tokens": self.prompt, "completion_tokens": self.deltas,
                            "prompt_tokens_details": {"cached_tokens": self.cached}}, final=False)
        self.on_event(kind, obj)
        if kind in self.TERMINAL:
            self.finished = True
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    def is_output(self, kind: str, obj: dict[str, Any]) -> bool:
        raise NotImplementedError

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def error_event(self, err: GatewayError) -> bytes:
        raise NotImplementedError

    def add_usage(self, usage: dict[str, Any] | None, final: bool) -> None:
        """Chat-shaped usage (see to_chat_usage in each API's module) into the tally."""
        if usage is None:
            return
        try:
            self.tally.add(usage, None if final else [{"index": 0}])
        except AbsurdUsage as e:
            log.warning("request %s: upstream usage not believed (%s)", self.rec.identity.request_id, e)

    @property
    def usage_final(self) -> bool:
        """vLLM's own final usage arrived (else the figures are the running count)."""
        return self.tally.final is not None

    def done(self) -> None:
        """The stream ended (in any way): the record gets the tallied usage and the time per output token.
        Without the final usage and without any event that reported the prompt, the usage is not vLLM's:
        the record says so (the prompt is counted by the gateway, gateway/apis/registry.py)."""
        self.tally.write(self.rec)
        if not self.usage_final and not self.prompt_known:
            self.rec.usage.usage_reported = False
        if self.last_token_at is not None:
            self.rec.mark_tokens_done(self.last_token_at)


def sse_event(kind: str, obj: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def starts_output(terminal: frozenset[str], output_kinds: tuple[str, ...]) -> Any:
    """A predicate over a parsed event: True once the stream carried output (or ended), so that the
    execute stage stops holding events back and a deployment that stalls before it can still be left.
    An error event before any output raises FirstChunkError: the next deployment may do better."""

    def has_started(obj: Any) -> bool:
        kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str):
            return True  # the relay reports it
        if kind == "error":
            raise FirstChunkError(obj.get("error") or {"code": obj.get("code"), "message": obj.get("message")})
        return kind in terminal or kind.endswith(output_kinds)

    return has_started

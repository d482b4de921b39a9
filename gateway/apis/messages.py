"""The Anthropic Messages API (POST /v1/messages): usage -> record, its stream events, its error shape.

vLLM reports Anthropic's usage, where `input_tokens` excludes the prompt tokens read from or written to
the prefix cache. The record keeps vLLM's own prompt count:
prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens,
completion_tokens = output_tokens, cached_tokens = cache_read_input_tokens.
Every error the gateway answers on /v1/messages has Anthropic's shape:
{"type": "error", "error": {"type": ..., "message": ...}}, in a body or as an `event: error`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.apis.events import EventAccountant, sse_event, starts_output
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.streaming import apply_usage

TERMINAL = frozenset({"message_stop"})
first_output = starts_output(TERMINAL, ("content_block_delta", "message_delta"))

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
          403: "permission_error", 404: "not_found_error", 408: "timeout_error", 409: "invalid_request_error",
          413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_json(err: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}


def error_body(err: GatewayError) -> bytes:
    return orjson.dumps(error_json(err))


def usage_to_record(rec: RequestRecord, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    parts = (usage.get("input_tokens"), usage.get("cache_read_input_tokens"), usage.get("cache_creation_input_tokens"))
    if all(p is None for p in parts):  # e.g. a message_delta with output_tokens only: the input stays as it was
        apply_usage(rec, {"prompt_tokens": rec.prompt_tokens, "completion_tokens": usage.get("output_tokens"),
                          "prompt_tokens_details": {"cached_tokens": rec.cached_tokens}})
        return
    prompt: Any = 0
    for p in parts:
        if p is None:
            continue
        if not isinstance(p, int) or isinstance(p, bool):
            prompt = p  # not a count: apply_usage refuses to believe it
            break
        prompt += p
    read = usage.get("cache_read_input_tokens")
    apply_usage(rec, {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens"),
                      "prompt_tokens_details": {"cached_tokens": read}})


def take_usage(rec: RequestRecord, body: Any) -> None:
    """Usage of a non-streaming message."""
    if isinstance(body, dict):
        usage_to_record(rec, body.get("usage"))


class MessagesAccountant(EventAccountant):
    """message_start (input usage), content_block_*, message_delta (cumulative output usage), message_stop."""

    __slots__ = ()

    TERMINAL = TERMINAL

    def is_output(self, kind: str, obj: dict[str, Any]) -> bool:
        return kind == "content_block_delta"

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                usage_to_record(self.rec, message.get("usage"))
        elif kind == "message_delta":
            usage_to_record(self.rec, obj.get("usage"))
            self.usage_seen = self.rec.usage_reported
        elif kind == "error":
            err = obj.get("error")
            self.upstream_error = err if isinstance(err, dict) else {"message": str(err)}

    def error_event(self, err: GatewayError) -> bytes:
        return sse_event("error", error_json(err))

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
from pydantic import BaseModel

from gateway.apis.events import EventAccountant, sse_event, starts_output
from gateway.errors import GatewayError

TERMINAL = frozenset({"message_stop"})
first_output = starts_output(TERMINAL, ("content_block_delta", "message_delta"))

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
          403: "permission_error", 404: "not_found_error", 408: "timeout_error", 409: "invalid_request_error",
          413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """The error shape on /v1/messages, as Anthropic's API and the anthropic SDK expect it."""

    type: str
    error: AnthropicErrorDetail


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_json(err: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}


def error_body(err: GatewayError) -> bytes:
    return orjson.dumps(error_json(err))


def to_chat_usage(usage: Any, prompt: Any = None, cached: Any = None) -> dict[str, Any] | None:
    """Anthropic usage in the chat shape the usage tally reads. Without any input field (a message_delta
    with output_tokens only), the prompt is what was known before (`prompt`, `cached`)."""
    if not isinstance(usage, dict):
        return None
    parts = (usage.get("input_tokens"), usage.get("cache_read_input_tokens"), usage.get("cache_creation_input_tokens"))
    if all(p is None for p in parts):
        total, read = prompt, cached
    else:
        total = 0
        for p in parts:
            if p is None:
                continue
            if not isinstance(p, int) or isinstance(p, bool):
                total = p  # not a count: the tally refuses to believe it
                break
            total += p
        read = usage.get("cache_read_input_tokens")
    return {"prompt_tokens": total, "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": {"cached_tokens": read}}


def body_usage(body: Any) -> dict[str, Any] | None:
    """Usage of a non-streaming message."""
    return to_chat_usage(body.get("usage")) if isinstance(body, dict) else None


class MessagesAccountant(EventAccountant):
    """message_start (input usage), content_block_*, message_delta (cumulative output usage), message_stop."""

    __slots__ = ()

    TERMINAL = TERMINAL

    def is_output(self, kind: str, obj: dict[str, Any]) -> bool:
        return kind == "content_block_delta"

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "message_start":
            message = obj.get("message")
            usage = to_chat_usage(message.get("usage")) if isinstance(message, dict) else None
            if usage is not None:  # vLLM sends it after the prefill, when it counts the prompt
                self.prompt_known = True
                self.prompt = usage["prompt_tokens"]
                self.cached = usage["prompt_tokens_details"]["cached_tokens"] or 0
                self.add_usage({**usage, "completion_tokens": 0}, final=False)
        elif kind == "message_delta":
            self.add_usage(to_chat_usage(obj.get("usage"), self.prompt, self.cached), final=True)
        elif kind == "error":
            err = obj.get("error")
            self.upstream_error = err if isinstance(err, dict) else {"message": str(err)}

    def error_event(self, err: GatewayError) -> bytes:
        return sse_event("error", error_json(err))

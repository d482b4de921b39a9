"""The OpenAI Responses API (POST /v1/responses): upper bound, usage -> record, its stream events and errors.

Usage maps to the record as: input_tokens -> prompt_tokens, output_tokens -> completion_tokens,
input_tokens_details.cached_tokens -> cached_tokens (vLLM's own figures, unchanged).
Errors keep OpenAI's shape; a stream that breaks ends with an `error` event and a `response.failed`
event, as OpenAI's own streams do.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from gateway import errors
from gateway.apis.events import EventAccountant, sse_event, starts_output
from gateway.errors import GatewayError
from gateway.record import RequestRecord

log = logging.getLogger("gateway.apis")

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
first_output = starts_output(TERMINAL, (".delta",))


def prepare(body: dict[str, Any]) -> str:
    """Set what the gateway owns in the body; returns the response id vLLM will store the answer under.

    The gateway names the response (vLLM takes its id from `request_id`): a client that chose its own
    could overwrite another tenant's stored response on a shared engine. The output bound
    (`max_output_tokens`) is set by the admit stage, as for every endpoint (gateway/reservation.py).
    """
    if "request_id" in body:
        raise errors.bad_request("'request_id' is set by the gateway (it becomes the response id); remove it.",
                                 param="request_id")
    response_id = f"resp_{uuid.uuid4().hex}"
    body["request_id"] = response_id
    return response_id


def wants_store(body: dict[str, Any]) -> bool:
    return body.get("store") is not False  # vLLM's default is store=true


def to_chat_usage(usage: Any) -> dict[str, Any] | None:
    """vLLM's Responses usage in the chat shape the usage tally reads (values unchanged, checked there)."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": {"cached_tokens": details.get("cached_tokens")}
            if isinstance(details, dict) else None}


def body_usage(body: Any) -> dict[str, Any] | None:
    """Usage of a non-streaming response object."""
    return to_chat_usage(body.get("usage")) if isinstance(body, dict) else None


class ResponsesAccountant(EventAccountant):
    """response.created ... response.output_text.delta ... response.completed (usage in the last event)."""

    __slots__ = ("response", "sequence")

    TERMINAL = TERMINAL

    def __init__(self, rec: RequestRecord, keep_payloads: bool = False, max_bytes: int = 1 << 62) -> None:
        super().__init__(rec, keep_payloads, max_bytes)
        self.response: dict[str, Any] | None = None  # from response.created: the shape of a failed one
        self.sequence = -1

    def is_output(self, kind: str, obj: dict[str, Any]) -> bool:
        return kind.endswith(".delta") and bool(obj.get("delta"))

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        seq = obj.get("sequence_number")
        if isinstance(seq, int):
            self.sequence = seq
        if kind == "response.created" and isinstance(obj.get("response"), dict):
            self.response = obj["response"]
        elif kind in TERMINAL:
            response = obj.get("response")
            if isinstance(response, dict):
                self.add_usage(to_chat_usage(response.get("usage")), final=True)
                if kind == "response.failed":
                    err = response.get("error")
                    self.upstream_error = err if isinstance(err, dict) else {"message": "response failed"}
        elif kind == "error":
            self.upstream_error = {"code": obj.get("code"), "message": obj.get("message")}

    def error_event(self, err: GatewayError) -> bytes:
        """An `error` event, then `response.failed` carrying the response with status failed."""
        self.sequence += 1
        out = sse_event("error", {"type": "error", "code": err.code, "message": err.message, "param": None,
                                  "sequence_number": self.sequence})
        if self.response is not None:
            self.sequence += 1
            failed = {**self.response, "status": "failed", "error": {"code": err.code, "message": err.message}}
            out += sse_event("response.failed", {"type": "response.failed", "sequence_number": self.sequence,
                                                 "response": failed})
        return out


def error_body(err: GatewayError) -> bytes:
    return err.to_json()  # OpenAI's shape, as for chat

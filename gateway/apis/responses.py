"""The OpenAI Responses API (POST /v1/responses): upper bound, usage -> record, its stream events and errors.

Usage maps to the record as: input_tokens -> prompt_tokens, output_tokens -> completion_tokens,
input_tokens_details.cached_tokens -> cached_tokens (vLLM's own figures, unchanged).
Errors keep OpenAI's shape; a stream that breaks ends with an `error` event and a `response.failed`
event, as OpenAI's own streams do.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aiohttp
import orjson

from gateway import errors
from gateway.apis.events import EventAccountant, sse_event, starts_output
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.upstream import DeploymentState

log = logging.getLogger("gateway.apis")
COUNT_TIMEOUT_S = 2.0

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

    def __init__(self, rec: RequestRecord, keep_payloads: bool = False) -> None:
        super().__init__(rec, keep_payloads)
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


def as_chat_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's input as the chat messages vLLM renders it from (None when it has other items)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list):
        return None
    for item in items:
        if not (isinstance(item, dict) and item.get("type", "message") == "message"
                and isinstance(item.get("role"), str)):
            return None  # tool calls, images, ...: not countable this way
        content = item.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(t, str) for t in parts):
                return None
            content = "".join(parts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            return None
        messages.append({"role": item["role"], "content": content})
    return messages


async def count_prompt(session: aiohttp.ClientSession, state: DeploymentState, body: dict[str, Any]) -> int | None:
    """Prompt tokens of a Responses request whose stream ended before its usage, counted by the engine
    that served it: its /tokenize over the same messages, plus (when it continues a stored response)
    that response's own input and output. None when it cannot be counted."""
    messages = as_chat_messages(body)
    if messages is None:
        log.warning("the prompt of an unfinished Responses stream has items other than text messages: not counted")
        return None
    base = 0
    url = state.spec.url
    try:
        async with asyncio.timeout(COUNT_TIMEOUT_S):
            prev = body.get("previous_response_id")
            if isinstance(prev, str):
                async with session.get(f"{url}/v1/responses/{prev}", headers=state.headers) as r:
                    usage = orjson.loads(await r.read()).get("usage") or {}
                base = int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)
            req = {"model": state.spec.upstream_model, "messages": messages}
            async with session.post(f"{url}/tokenize", data=orjson.dumps(req),
                                    headers={**state.headers, "Content-Type": "application/json"}) as r:
                count = orjson.loads(await r.read()).get("count")
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        log.warning("could not count the prompt of an unfinished Responses stream on %s", state.name)
        return None
    return base + count if isinstance(count, int) and not isinstance(count, bool) else None


def error_body(err: GatewayError) -> bytes:
    return err.to_json()  # OpenAI's shape, as for chat

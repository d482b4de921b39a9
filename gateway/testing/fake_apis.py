"""The test upstream's Responses API (with its store) and Anthropic Messages API, with the same fault switches.

Shapes follow what vLLM 0.32 sends (named SSE events, usage in response.completed / message_delta);
token counts follow the test upstream's rule (one token per word) and feed the same counters.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from gateway.testing.fake_vllm import FakeVLLM


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _words(value: Any) -> int:
    """Words in a string or in the text parts of a list of items/blocks."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v.get("content", v.get("text", ""))) if isinstance(v, dict) else _words(v) for v in value)
    return 0


def _item_words(item: Any) -> int:
    """Words of one Responses input item as its chat message renders them."""
    if not isinstance(item, dict):
        return 0
    if item.get("type") == "function_call_output":
        return _words(item.get("output"))
    return _words(item.get("content", item.get("text", "")))


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


async def _stream(fake: FakeVLLM, request: web.Request, head: list[bytes], token: Callable[[int], bytes], n: int,
                  tail: Callable[[], list[bytes]], error: bytes) -> web.StreamResponse:
    """Write head events, n token events (with the fault switches), then tail events."""
    b = fake.b
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for e in head:
            await resp.write(e)
        if b.ttft_ms:
            await asyncio.sleep(b.ttft_ms / 1e3)
        for i in range(n):
            if i and b.itl_ms:
                await asyncio.sleep(b.itl_ms / 1e3)
            if i == b.die_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if i == b.stall_after_chunks:
                await asyncio.sleep(3600)
            if i == b.malformed_after_chunks:
                await resp.write(b"data: {not json\n\n")
                return resp
            if i == b.error_event_after_chunks:
                await resp.write(error)
                return resp
            fake.c.generation_tokens += 1
            await resp.write(token(i))
        for e in tail():
            await resp.write(e)
    except (ConnectionResetError, ConnectionError):
        pass  # the client (the gateway) went away: like vLLM, just stop
    return resp


class FakeApis:
    def __init__(self, fake: FakeVLLM) -> None:
        self.fake = fake
        self.stored: dict[str, dict[str, Any]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/responses", self.responses), web.get("/v1/responses/{id}", self.retrieve),
                web.post("/v1/responses/{id}/cancel", self.cancel), web.post("/v1/messages", self.messages),
                web.post("/detokenize", self.detokenize)]

    async def _begin(self, request: web.Request, check: Callable[[dict[str, Any]], web.Response | None]
                     ) -> tuple[dict[str, Any], web.Response | None]:
        body = orjson.loads(await request.read())
        self.fake.c.last_request = body
        if self.fake.b.fail_status:
            return body, _json({"error": {"message": f"injected failure {self.fake.b.fail_status}",
                                          "type": "InternalError", "code": self.fake.b.fail_status}},
                               status=self.fake.b.fail_status)
        if body.get("model") not in self.fake.models:
            return body, _json({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                          "type": "NotFoundError", "code": 404}}, status=404)
        return body, check(body)

    async def _run(self, prompt: int, n: int, work: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        c = self.fake.c
        c.requests += 1
        c.prompt_tokens += prompt
        c.running += 1
        try:
            return await work()
        finally:
            c.running -= 1

    def _too_long(self, prompt: int, n: int) -> web.Response | None:
        if prompt + n <= self.fake.max_model_len:
            return None
        return _json({"error": {"message": f"This model's maximum context length is {self.fake.max_model_len} "
                                f"tokens. However, you requested {prompt + n} tokens.", "type": "BadRequestError",
                                "code": 400}}, status=400)

    # ------------------------------------------------------------------ Responses
    def _check_response(self, body: dict[str, Any]) -> web.Response | None:
        prev = body.get("previous_response_id")
        if prev is not None and prev not in self.stored:
            return _json({"error": {"message": f"Response with id '{prev}' not found.", "type": "NotFoundError",
                                    "param": "previous_response_id", "code": 404}}, status=404)
        return None

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, err = await self._begin(request, self._check_response)
        if err is not None:
            return err
        prev = self.stored.get(body.get("previous_response_id") or "")
        # rendered as chat messages (instructions as a system message, each input item as a message: a tool
        # output as the tool's message, a function call as an assistant turn), counted like the chat endpoint
        items = body.get("input")
        prompt = 2 + (4 + _words(body["instructions"]) if body.get("instructions") else 0) + (
            4 + _words(items) if isinstance(items, str) else sum(4 + _item_words(i) for i in items or ()))
        if prev is not None:
            prompt += prev["usage"]["total_tokens"]
        n = int(body.get("max_output_tokens") or self.fake.b.default_tokens)
        if err := self._too_long(prompt, n):
            return err
        rid = body.get("request_id") or f"resp_{uuid.uuid4().hex}"
        base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": body["model"],
                "previous_response_id": body.get("previous_response_id"), "tools": [], "tool_choice": "auto",
                "parallel_tool_calls": True, "error": None, "incomplete_details": None}

        def final(text: str) -> dict[str, Any]:
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
                     "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + n}
            out = {**base, "status": "completed", "output": [
                {"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]}], "usage": usage}
            if self.fake.b.omit_usage:
                out["usage"] = None
            if body.get("store") is not False:
                self.stored[rid] = {**out, "usage": usage}
            return out

        async def work() -> web.StreamResponse:
            if not body.get("stream"):
                await asyncio.sleep((self.fake.b.ttft_ms + self.fake.b.itl_ms * max(0, n - 1)) / 1e3)
                self.fake.c.generation_tokens += n
                return _json(final("".join(f"tok{i} " for i in range(n))))
            seq = iter(range(1_000_000))
            started = {**base, "status": "in_progress", "output": [], "usage": None}
            head = [_event("response.created", {"sequence_number": next(seq), "response": started}),
                    _event("response.in_progress", {"sequence_number": next(seq), "response": started})]

            def token(i: int) -> bytes:
                return _event("response.output_text.delta", {"sequence_number": next(seq), "item_id": f"msg_{rid}",
                                                             "output_index": 0, "content_index": 0,
                                                             "delta": f"tok{i} ", "logprobs": []})

            def tail() -> list[bytes]:
                return [_event("response.completed", {"sequence_number": next(seq),
                                                      "response": final("".join(f"tok{i} " for i in range(n)))})]

            error = _event("error", {"sequence_number": next(seq), "code": "internal_error",
                                     "message": "injected engine error", "param": None})
            return await _stream(self.fake, request, head, token, n, tail, error)

        return await self._run(prompt, n, work)

    async def retrieve(self, request: web.Request) -> web.Response:
        stored = self.stored.get(request.match_info["id"])
        if stored is None:
            return _json({"error": {"message": f"Response with id '{request.match_info['id']}' not found.",
                                    "type": "NotFoundError", "code": 404}}, status=404)
        return _json(stored)

    async def cancel(self, request: web.Request) -> web.Response:
        stored = self.stored.get(request.match_info["id"])
        if stored is None:
            return _json({"error": {"message": "not found", "type": "NotFoundError", "code": 404}}, status=404)
        return _json({"error": {"message": "Cannot cancel a synchronous response.", "type": "BadRequestError",
                                "code": 400}}, status=400)

    # ------------------------------------------------------------------ Messages
    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, err = await self._begin(request, lambda b: None)
        if err is not None:
            return _anthropic_error(err)
        prompt = 2 + sum(4 + _words(m.get("content")) for m in body["messages"]) + _words(body.get("system") or "")
        n = int(body.get("max_tokens") or self.fake.b.default_tokens)
        if err := self._too_long(prompt, n):
            return _anthropic_error(err)
        mid = f"msg_{uuid.uuid4().hex}"
        base = {"id": mid, "type": "message", "role": "assistant", "model": body["model"]}

        async def work() -> web.StreamResponse:
            if not body.get("stream"):
                await asyncio.sleep((self.fake.b.ttft_ms + self.fake.b.itl_ms * max(0, n - 1)) / 1e3)
                self.fake.c.generation_tokens += n
                out = {**base, "content": [{"type": "text", "text": "".join(f"tok{i} " for i in range(n))}],
                       "stop_reason": "max_tokens", "stop_sequence": None,
                       "usage": {"input_tokens": prompt, "output_tokens": n}}
                if self.fake.b.omit_usage:
                    del out["usage"]
                return _json(out)
            head = [_event("message_start", {"message": {**base, "content": [], "stop_reason": None,
                                                         "stop_sequence": None,
                                                         "usage": {"input_tokens": prompt, "output_tokens": 0}}}),
                    _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]

            def token(i: int) -> bytes:
                return _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}})

            def tail() -> list[bytes]:
                return [_event("content_block_stop", {"index": 0}),
                        _event("message_delta", {"delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                                 "usage": {"input_tokens": prompt, "output_tokens": n}}),
                        _event("message_stop", {})]

            error = _event("error", {"error": {"type": "internal_error", "message": "injected engine error"}})
            return await _stream(self.fake, request, head, token, n, tail, error)

        return await self._run(prompt, n, work)

    async def detokenize(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        return _json({"prompt": " ".join(f"tok{t}" for t in body.get("tokens", []))})


def _anthropic_error(resp: web.Response) -> web.Response:
    """vLLM answers /v1/messages errors in Anthropic's shape."""
    assert isinstance(resp.body, bytes)
    err = orjson.loads(resp.body)["error"]
    return _json({"type": "error", "error": {"type": err["type"], "message": err["message"]}}, status=resp.status)

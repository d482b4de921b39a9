"""Raw ASGI for the hot path: the request headers the gateway reads, JSON answers, and the client-gone watcher."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive, Send

from gateway.guards import SINGLE_HEADERS


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


_WANTED = frozenset({b"authorization", b"x-api-key", b"x-request-id", b"content-length", b"x-gateway-task",
                     b"x-gateway-deadline-ms", b"cache-control", b"traceparent", b"tracestate",
                     b"x-gateway-priority-class"})
JSON_CT = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream; charset=utf-8")


DUPLICATE = b":duplicate"  # names a must-be-single header that came twice (answered with a 400)


def wanted_headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for k, v in raw:
        if k in _WANTED:
            if k in headers and k in SINGLE_HEADERS:
                headers[DUPLICATE] = k
            headers[k] = v
    return headers


def encode_headers(headers: dict[str, str], content_type: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [content_type, *((k.encode(), v.encode()) for k, v in headers.items())]


async def respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    h = encode_headers(headers, JSON_CT)
    h.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})

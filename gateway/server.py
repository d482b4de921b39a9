"""HTTP server protocol: uvicorn's httptools protocol plus a deadline for the request line and headers.

uvicorn times out idle keep-alive connections and (in app.py) the gateway times out slow bodies, but
nothing cuts off a client that sends its headers one byte a second (header slowloris): each such
connection is held for ever. This protocol notes when a connection opens and when a request begins,
forgets it when the headers are complete, and one sweeper per worker (a timer every `tick` seconds,
not a timer per request) answers 408 and closes each connection whose headers are overdue. The same
deadline bounds the unread rest of a body the app answered early (408/413/401).
`gateway serve` selects it with `http="gateway.server:HeaderDeadlineProtocol"`; the deadline comes from
server.header_timeout through the environment, so every worker process reads the same value.
It relies on HttpToolsProtocol's parser callbacks and `cycle` (checked with uvicorn 0.54);
tests/test_adversarial_edges.py fails if a uvicorn upgrade changes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_ENV = "GATEWAY_HEADER_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 10.0

log = logging.getLogger("gateway.server")

_BODY = orjson.dumps({"error": {"message": "The request headers did not arrive in time.",
                                "type": "invalid_request_error", "param": None, "code": "request_timeout"}})
RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)


def header_timeout() -> float:
    try:
        return float(os.environ.get(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT))
    except ValueError:
        return DEFAULT_HEADER_TIMEOUT


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose connections must finish each request's headers within header_timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout()
        self.waiting_since: float | None = None  # loop time the headers (or an unread body) became due
        self.answer_when_late = True  # False while only the unread rest of an answered body is awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_since = self.loop.time()  # a connection that opens and sends nothing is cut off too
        _Sweeper.of(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.waiting_since is None:  # a later request on a kept-alive connection
            self.waiting_since, self.answer_when_late = self.loop.time(), True

    def on_headers_complete(self) -> None:
        self.waiting_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered (408, 413, 401...) before the body arrived whole: uvicorn discards the rest as it
            # comes, and each byte cancels its keep-alive timer, so a trickle would hold the connection
            # for ever. Give the rest one header_timeout; no close right away (that would reset the
            # connection under a client still sending, and it might never read the answer).
            self.waiting_since, self.answer_when_late = self.loop.time(), False

    def too_slow(self) -> None:
        self.waiting_since = None
        if self.transport.is_closing():
            return
        if self.answer_when_late and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(RESPONSE_408)  # never in the middle of another response
        self.transport.close()


class _Sweeper:
    """One per worker (kept on uvicorn's shared ServerState): closes the connections whose time is up."""

    def __init__(self, proto: HeaderDeadlineProtocol) -> None:
        self.loop = proto.loop
        self.connections = proto.connections  # uvicorn's set of this worker's open connections
        self.timeout = proto.header_timeout
        self.tick = min(1.0, self.timeout / 4)
        self.last_logged = float("-inf")
        self.loop.call_later(self.tick, self.sweep)

    @classmethod
    def of(cls, proto: HeaderDeadlineProtocol) -> None:
        state = proto.server_state
        if getattr(state, "gateway_sweeper", None) is None:
            state.gateway_sweeper = cls(proto)  # type: ignore[attr-defined]

    def sweep(self) -> None:
        due = self.loop.time() - self.timeout
        late = [c for c in self.connections
                if isinstance(c, HeaderDeadlineProtocol) and c.waiting_since is not None and c.waiting_since <= due]
        for conn in late:
            conn.too_slow()
        if late and time.monotonic() - self.last_logged >= 10.0:  # one line per 10 s per worker
            self.last_logged = time.monotonic()
            log.warning("closed %d connection(s): request headers or body incomplete after %gs",
                        len(late), self.timeout)
        self.loop.call_later(self.tick, self.sweep)

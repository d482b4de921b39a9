"""HTTP server protocol: uvicorn's httptools protocol plus a deadline for the request line and headers.

uvicorn times out idle keep-alive connections and (in app.py) the gateway times out slow bodies, but
nothing cuts off a client that sends its headers one byte a second (header slowloris): each such
connection is held for ever. This protocol arms a timer when a connection opens and when a request
begins, disarms it when the headers are complete, and on expiry answers 408 and closes the connection.
The same deadline bounds the unread rest of a body the app answered early (408/413/401).
`gateway serve` selects it with `http="gateway.server:HeaderDeadlineProtocol"`; the deadline comes from
server.header_timeout through the environment, so every worker process reads the same value.
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

    _last_logged = float("-inf")  # class-wide: one log line per 10 s per worker, however many clients

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout()
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that opens and sends nothing is cut off too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered (408, 413, 401...) before the body arrived whole: uvicorn discards the rest as it
            # comes, and each byte cancels its keep-alive timer, so a trickle would hold the connection
            # for ever. Give the rest one header_timeout; no close right away (that would reset the
            # connection under a client still sending, and it might never read the answer).
            self._disarm()
            self._arm(answer=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, answer: bool = True) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow, answer)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self, answer: bool) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if answer and (self.cycle is None or self.cycle.response_complete):  # never inside another response
            self.transport.write(RESPONSE_408)
        self.transport.close()
        now = time.monotonic()
        if now - HeaderDeadlineProtocol._last_logged >= 10.0:
            HeaderDeadlineProtocol._last_logged = now
            log.warning("closed a connection from %s: request headers incomplete after %gs",
                        self.client[0] if self.client else "?", self.header_timeout)

"""Does an HTTP client let go of vLLM when the gateway gives up on a request? aiohttp, pyreqwest, pyqwest.

The gateway cancels its upstream call when the client leaves (or a deadline passes); vLLM aborts the
request only when its connection closes, so a client library whose cancelled call keeps the connection
open makes vLLM generate a whole answer nobody reads, and the gateway cannot know what it did. This
script checks, against a local TCP server that records when each connection closes:

  1. a call cancelled while waiting for the answer: is the connection closed, and how fast;
  2. a call past its total timeout on a connection that was made: which error it raises (a "connect"
     timeout would make the gateway send the request to another deployment as if vLLM never saw it).

    .venv/bin/python -m loadtests.check_client_cancel
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

import aiohttp

WAIT_S = 2.0


class Server:
    """Reads a request, never answers, records when each connection was opened and when its peer closed it."""

    def __init__(self) -> None:
        self.connections: list[list[float | None]] = []  # [opened, closed or None]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: list[float | None] = [time.monotonic(), None]
        self.connections.append(conn)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):  # cancelled: a client that never let go
            while await reader.read(65536):
                pass
            conn[1] = time.monotonic()
        writer.close()

    def closed_since(self, t: float) -> float | None:
        """When the first connection opened after `t` was closed (None: still open)."""
        for opened, closed in self.connections:
            if opened is not None and opened >= t:
                return closed
        return None


async def _aiohttp_call(url: str, timeout_s: float | None) -> None:
    async with aiohttp.ClientSession() as s, s.post(url, data=b"{}", timeout=aiohttp.ClientTimeout(
            total=timeout_s)) as r:
        await r.read()


def _pyreqwest_client() -> Any:
    from pyreqwest.client import ClientBuilder

    return ClientBuilder().http1_only().build()


async def _pyreqwest_call(url: str, timeout_s: float | None) -> None:
    req = _pyreqwest_client().post(url).body_bytes(b"{}")
    if timeout_s is not None:
        req = req.timeout(timedelta(seconds=timeout_s))
    async with req.build_streamed() as r:
        await r.bytes()


async def _pyqwest_call(url: str, timeout_s: float | None) -> None:
    import pyqwest

    transport = pyqwest.HTTPTransport(http_version=pyqwest.HTTPVersion.HTTP1, timeout=timeout_s, enable_otel=False)
    await pyqwest.Client(transport).post(url, content=b"{}")


async def check(name: str, call: Any, server: Server, url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"client": name}
    started = time.monotonic()
    task = asyncio.create_task(call(url, None))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    deadline = t0 + WAIT_S
    while (closed := server.closed_since(started)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    out["cancel_closes_connection"] = closed is not None
    out["closed_after_ms"] = round((closed - t0) * 1e3, 1) if closed is not None else None
    try:
        await call(url, 0.3)
        out["timeout_error"] = "none"
    except Exception as e:  # noqa: BLE001 - the class is what this reports
        out["timeout_error"] = type(e).__name__
    return out


async def main(quiet: bool = False) -> list[dict[str, Any]]:
    server = Server()
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows = [await check("aiohttp", _aiohttp_call, server, url)]
    for name, call in (("pyreqwest", _pyreqwest_call), ("pyqwest", _pyqwest_call)):
        try:
            rows.append(await check(name, call, server, url))
        except ImportError:
            print(f"{name} is not installed (pip install {name})")
    srv.close()
    if quiet:
        return rows
    print(f"{'client':10} {'cancel closes the connection':>28} {'after':>9} {'total timeout raises':>24}")
    for r in rows:
        after = f"{r['closed_after_ms']} ms" if r["closed_after_ms"] is not None else f"> {WAIT_S:g} s"
        print(f"{r['client']:10} {str(r['cancel_closes_connection']):>28} {after:>9} {r['timeout_error']:>24}")
    return rows


if __name__ == "__main__":
    asyncio.run(main())

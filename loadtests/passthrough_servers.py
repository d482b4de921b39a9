"""Bare pass-throughs on other servers and clients than aiohttp's, to measure the floor under the gateway.

The same job as loadtests/passthrough.py (forward POST /v1/* to one upstream, relay a JSON body whole or
an SSE stream chunk by chunk; no features), written as a raw ASGI app (uvicorn or granian) and as an
RSGI app (granian's own interface), with aiohttp's client, pyreqwest or pyqwest (both Rust: reqwest/hyper).
bench_gateway.py runs them beside the aiohttp pass-through so the figures compare within one run.

    PT_UPSTREAM=http://127.0.0.1:8101 PT_CLIENT=pyreqwest uvicorn loadtests.passthrough_servers:asgi_app
    PT_UPSTREAM=... PT_CLIENT=aiohttp granian --interface rsgi loadtests.passthrough_servers:rsgi_app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

UPSTREAM = os.environ.get("PT_UPSTREAM", "http://127.0.0.1:8101").rstrip("/")
CLIENT = os.environ.get("PT_CLIENT", "aiohttp")  # aiohttp | pyreqwest | pyqwest
_JSON = "application/json"


class Forwarder:
    """One pooled keep-alive client (created lazily, inside the server's event loop)."""

    def __init__(self) -> None:
        self._client: Any = None

    def _get(self) -> Any:
        if self._client is None:
            if CLIENT == "pyreqwest":
                from pyreqwest.client import ClientBuilder

                self._client = ClientBuilder().http1_only().build()
            elif CLIENT == "pyqwest":
                import pyqwest

                self._client = pyqwest.Client(pyqwest.HTTPTransport(
                    http_version=pyqwest.HTTPVersion.HTTP1, enable_gzip=False, enable_brotli=False,
                    enable_zstd=False, enable_otel=False, follow_redirects=False))
            else:
                import aiohttp

                self._client = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None), auto_decompress=False)
        return self._client

    async def forward(self, path: str, body: bytes) -> tuple[int, str, AsyncIterator[bytes] | bytes, Any]:
        """(status, content type, the body or its chunks, the response to close)."""
        client = self._get()
        if CLIENT == "pyreqwest":
            ctx = client.post(UPSTREAM + path).header("content-type", _JSON).body_bytes(body).build_streamed()
            resp = await ctx.__aenter__()
            ct = resp.headers.get("content-type", "")
            if not ct.startswith("text/event-stream"):
                data = bytes(await resp.bytes())
                await ctx.__aexit__(None, None, None)
                return resp.status, ct, data, None

            async def chunks() -> AsyncIterator[bytes]:
                while (chunk := await resp.body_reader.read_chunk()) is not None:
                    yield bytes(chunk)
            return resp.status, ct, chunks(), ctx
        if CLIENT == "pyqwest":
            ctx = client.stream("POST", UPSTREAM + path, headers={"content-type": _JSON}, content=body)
            resp = await ctx.__aenter__()
            ct = resp.headers.get("content-type", "")
            if not ct.startswith("text/event-stream"):
                data = b"".join([bytes(c) async for c in resp.content])
                await ctx.__aexit__(None, None, None)
                return resp.status, ct, data, None

            async def qchunks() -> AsyncIterator[bytes]:
                async for chunk in resp.content:
                    yield bytes(chunk)
            return resp.status, ct, qchunks(), ctx
        ctx = client.post(UPSTREAM + path, data=body, headers={"content-type": _JSON})
        up = await ctx.__aenter__()
        ct = up.headers.get("content-type", "")
        if not ct.startswith("text/event-stream"):
            data = await up.read()
            await ctx.__aexit__(None, None, None)
            return up.status, ct, data, None
        return up.status, ct, up.content.iter_any(), ctx


_fwd = Forwarder()


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    parts = []
    while True:
        m = await receive()
        parts.append(m.get("body", b""))
        if not m.get("more_body"):
            break
    status, ct, out, ctx = await _fwd.forward(scope["path"], b"".join(parts))
    if isinstance(out, bytes):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ct.encode()), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
        return
    try:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ct.encode())]})
        async for chunk in out:  # one client write per upstream read
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await ctx.__aexit__(None, None, None)


async def rsgi_app(scope: Any, proto: Any) -> None:
    if scope.method != "POST":
        proto.response_bytes(200, [("content-type", "text/plain")], b"ok")
        return
    status, ct, out, ctx = await _fwd.forward(scope.path, await proto())
    if isinstance(out, bytes):
        proto.response_bytes(status, [("content-type", ct)], out)
        return
    try:
        transport = proto.response_stream(status, [("content-type", ct)])
        async for chunk in out:
            await transport.send_bytes(chunk)
    finally:
        await ctx.__aexit__(None, None, None)

"""A bare aiohttp pass-through (server + client, no features): the floor the gateway is measured against.

Forwards POST /v1/* to one upstream and relays the answer: a JSON body whole, an SSE stream chunk by
chunk. No auth, accounting, logging or metrics. bench_gateway.py runs it beside the gateway in the
same run, so "gateway req/s / pass-through req/s" means the same on any machine.

    python -m loadtests.passthrough --port 8300 --upstream http://127.0.0.1:8101
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
                        "host"})


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session: aiohttp.ClientSession | None = None

    async def start(_: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                                        auto_decompress=False)

    async def stop(_: web.Application) -> None:
        if session is not None:
            await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with session.post(upstream + request.path, data=body, headers=headers) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            if not up.content_type.startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(), headers=out_headers)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():  # one client write per upstream read
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/v1/{tail:.*}", forward)
    app.router.add_get("/healthz", health)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8101")
    a = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # plain asyncio works too, a little slower
        pass
    web.run_app(make_app(a.upstream.rstrip("/")), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

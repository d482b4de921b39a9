"""App assembly: the worker's stages, their start and stop, FastAPI for the gateway's own endpoints, and
the ASGI entry that sends the proxied endpoints straight down the request pipeline (gateway/pipeline.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import errors
from gateway.apis import retrieve
from gateway.apis.contract import PATHS
from gateway.config import GatewayConfig, load_config
from gateway.drain import Drain
from gateway.errors import GatewayError, error_response
from gateway.openapi import install_openapi
from gateway.pipeline import Gateway
from gateway.protocol import Endpoint
from gateway.relay import DRAIN_S
from gateway.routes import router


class FastPath:
    """ASGI entry: the proxied endpoints go straight to Gateway.handle; everything else to FastAPI."""

    ROUTES: dict[str, Endpoint] = PATHS

    def __init__(self, gw: Gateway, app: FastAPI, drain: Drain) -> None:
        self.gw, self.app, self.drain = gw, app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.drain.draining and scope["type"] == "http":
            send = _closing(send)  # this replica is going: clients reconnect (to another) for their next request
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.ROUTES.get(scope["path"])
            if endpoint is not None:
                await self.gw.handle(scope, receive, send, endpoint)
                return
        stored = retrieve.endpoint_of(scope["path"]) if scope["type"] == "http" else None
        if stored is not None:  # a stored response: through the same pipeline, to its engine only
            await self.gw.handle(scope, receive, send, stored)  # type: ignore[arg-type]
            return
        await self.app(scope, receive, send)


def _closing(send: Send) -> Send:
    async def closing(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)
    return closing


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the stages that talk to the network; on the way out, let cut requests write their records."""
    gw: Gateway = app.state.gateway
    app.state.drain.install()
    await gw.pool.start()
    gw.live.start(gw.pool.session)
    gw.task_auto.start()  # fits task_auto's classifiers in the background (the default route meanwhile)
    gw.adapters.start()
    await gw.store.start()
    if gw.spool is not None:
        await gw.spool.start()  # what a gateway before this one left there is replayed once Redis answers
    await gw.limiter.start()
    if gw.ledger.backend is not gw.store:
        await gw.ledger.backend.start()  # the embedded SQLite file (or this process's memory)
    await gw.ledger.start()
    roller = asyncio.create_task(gw.metrics.spend.keep_rolled(), name="spend-rollover")
    try:
        yield
    finally:
        roller.cancel()
        app.state.drain.uninstall()
        if gw.active:  # requests cut by shutdown are still draining vLLM and writing their records
            await asyncio.wait(list(gw.active), timeout=DRAIN_S + 1.0)
        await gw.live.close()
        await gw.task_auto.close()
        await gw.adapters.close()
        await gw.pool.close()
        await gw.limiter.close()
        await gw.cache.close()
        await gw.ledger.close()  # writes what is still buffered, if the store answers
        if gw.ledger.backend is not gw.store:
            await gw.ledger.backend.close()
        if gw.spool is not None:
            await gw.spool.close()
        await gw.store.close()
        gw.finalizer.request_log.close()
        if gw.tracing is not None:
            await asyncio.to_thread(gw.tracing.shutdown)  # exports the spans still queued


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(GatewayError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))


async def _validation_error(request: Request, exc: Exception) -> Response:
    return error_response(errors.bad_request(str(exc)))


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


def create_app(config: GatewayConfig | None = None) -> FastPath:
    """Build the app; with no config, load the file named by GATEWAY_CONFIG (uvicorn --factory workers)."""
    if config is None:
        config = load_config(os.environ["GATEWAY_CONFIG"])
    gw = Gateway(config)
    srv = config.server
    # No redirect on a trailing slash (its Location would come from the client's Host header): a 404.
    # /docs and /redoc load Swagger UI / ReDoc from a CDN, so they are off unless server.docs is set.
    app = FastAPI(title="vLLM gateway", version="0.1.0", lifespan=_lifespan, redirect_slashes=False,
                  openapi_url="/openapi.json" if srv.openapi else None,
                  docs_url="/docs" if srv.docs and srv.openapi else None,
                  redoc_url="/redoc" if srv.docs and srv.openapi else None)
    app.state.gateway = gw
    app.state.drain = drain = Drain(srv.drain_notice_s)
    app.include_router(router)
    install_openapi(app, [*config.models, *config.routes])
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(GatewayError, _gateway_error)
    return FastPath(gw, app, drain)

"""The ASGI application: routes, and the request's path through the stages in their order.

parse + validate -> authenticate -> plan/execute (execute.py) -> finalize (finalize.py)
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from gateway import errors
from gateway.auth import Authenticator
from gateway.config import GatewayConfig, load_config
from gateway.errors import GatewayError
from gateway.execute import Executor
from gateway.finalize import Finalizer, RequestLog, early_headers, final_headers, stream_trailer
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.protocol import Endpoint, validate_request
from gateway.record import RequestRecord
from gateway.streaming import StreamAccountant
from gateway.upstream import UpstreamPool

log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
JSON = "application/json"


class Gateway:
    """Everything one worker needs to serve, built once at start-up from the compiled config."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.auth = Authenticator(config)
        self.pool = UpstreamPool(config, on_checked=self._health_checked)
        self.executor = Executor(self.pool)
        deployments = {d.name for m in config.models.values() for d in m.deployments}
        self.metrics = GatewayMetrics(set(config.models), deployments)
        self.finalizer = Finalizer(config, self.metrics, RequestLog(config.server.request_log))
        self.max_body = config.server.max_body_bytes

    def _health_checked(self, pool: UpstreamPool) -> None:
        for name, state in pool.states.items():
            self.metrics.upstream_healthy.labels(name).set(1 if state.healthy else 0)

    async def read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise errors.payload_too_large(self.max_body)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise errors.payload_too_large(self.max_body)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise errors.bad_request("Request body is empty; expected a JSON object.")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise errors.bad_request(f"Request body is not valid JSON: {e.msg}", code="invalid_json") from None

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        rid = request.headers.get("x-request-id")
        rec = RequestRecord(rid if rid and _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex, endpoint)
        try:
            tenant, key_hash = self.auth.authenticate(request.headers.get("authorization"))
            rec.tenant, rec.api_key_hash = tenant.name, key_hash
            body = await self.read_json(request)
            req = validate_request(endpoint, body)
            rec.requested_model = req.model
            model = self.config.models.get(req.model)
            if model is None:
                raise errors.model_not_found(req.model)
            self.finalizer.begin(rec)
            if endpoint != "embeddings" and body.get("stream"):
                return await self._stream(rec, model, endpoint, body)
            data = await self.executor.call(rec, model, endpoint, body)
            rec.status = 200
            self.finalizer.finalize(rec)
            return Response(data, media_type=JSON, headers=final_headers(rec))
        except GatewayError as e:
            return self._error(rec, e)
        except Exception:
            log.exception("internal error in request %s", rec.request_id)
            return self._error(rec, GatewayError(500, f"Internal gateway error (request id {rec.request_id}).",
                                                 type="api_error", code="internal_error"))

    def _error(self, rec: RequestRecord, e: GatewayError) -> Response:
        rec.status, rec.error_code, rec.outcome = e.status, e.code, "error"
        self.finalizer.finalize(rec)
        return Response(e.to_json(), status_code=e.status, media_type=JSON,
                        headers={**final_headers(rec), **e.headers})

    async def _stream(self, rec: RequestRecord, model: Any, endpoint: Endpoint, body: dict[str, Any]) -> Response:
        rec.stream = True
        asked = body.get("stream_options") or {}
        acct = StreamAccountant(rec, bool(asked.get("include_usage")), bool(asked.get("continuous_usage_stats")))
        body["stream_options"] = {**asked, "include_usage": True, "continuous_usage_stats": True}
        stream = await self.executor.open_stream(rec, model, endpoint, body)
        rec.status = 200
        finalizer = self.finalizer
        finalized = False

        def on_done() -> bytes:
            nonlocal finalized
            finalizer.finalize(rec)
            finalized = True
            return stream_trailer(rec)

        async def events() -> AsyncIterator[bytes]:
            nonlocal finalized
            try:
                async for chunk in self.executor.relay(stream, rec, acct, on_done):
                    yield chunk
            finally:
                if not finalized:
                    finalized = True
                    finalizer.finalize(rec)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**early_headers(rec), "Cache-Control": "no-cache"})

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": m.owned_by,
             "root": m.deployments[0].upstream_model}
            for name, m in self.config.models.items()]}


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    """Build the app; with no config, load the file named by GATEWAY_CONFIG (uvicorn --factory workers)."""
    if config is None:
        config = load_config(os.environ["GATEWAY_CONFIG"])
    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.pool.start()
        try:
            yield
        finally:
            await gw.pool.close()
            gw.finalizer.request_log.close()

    app = FastAPI(title="vLLM gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gw

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gw.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gw.handle(request, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gw.handle(request, "embeddings")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            gw.auth.authenticate(request.headers.get("authorization"))
        except GatewayError as e:
            return Response(e.to_json(), status_code=e.status, media_type=JSON)
        return Response(orjson.dumps(gw.list_models()), media_type=JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = gw.pool.ready_models()
        ok = all(ready.values())
        return Response(orjson.dumps({"ready": ok, "models": ready}), status_code=200 if ok else 503,
                        media_type=JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        e = GatewayError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return Response(e.to_json(), status_code=e.status, media_type=JSON)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return Response(errors.bad_request(str(exc)).to_json(), status_code=400, media_type=JSON)

    return app

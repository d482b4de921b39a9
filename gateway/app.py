"""The ASGI application: routes, and the request's path through the stages in their order.

parse + validate -> authenticate -> plan/execute (execute.py) -> finalize (finalize.py)
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import errors
from gateway.auth import Authenticator
from gateway.cache import Lookup, RecordingAccountant, build_cache, replay
from gateway.config import GatewayConfig, load_config
from gateway.errors import GatewayError
from gateway.execute import Executor
from gateway.finalize import Finalizer, RequestLog, early_headers, final_headers, stream_trailer
from gateway.ledger import Ledger, parse_time
from gateway.limits import build_limiter
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.openapi import install_openapi
from gateway.protocol import Endpoint, validate_request
from gateway.record import RequestRecord
from gateway.relay import DRAIN_S, Relay
from gateway.routing.balance import Balancing
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.routing.live import LiveStats
from gateway.routing.policy import Plan, Planner
from gateway.store import StoreUnavailable, build_store
from gateway.streaming import StreamAccountant
from gateway.upstream import UpstreamPool

log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
JSON = "application/json"


class Gateway:
    """Everything one worker needs to serve, built once at start-up from the compiled config."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.max_body = config.server.max_body_bytes
        self.body_timeout = config.server.body_timeout
        self.auth = Authenticator(config)
        deployments = {d.name for m in config.models.values() for d in m.deployments}
        self.metrics = GatewayMetrics(set(config.models), deployments)
        # Response cache, limits and budgets, usage ledger: one store (Redis, or in-process without a URL).
        f = config.features
        self._redis_logged: dict[str, float] = {}
        self.store = build_store(config, self._redis_error)
        self.cache = build_cache(config, self.store)
        self.limiter = build_limiter(config, self.store, self._spend_seen)
        self.ledger = Ledger(self.store, f.redis.ledger_buffer, f.redis.ledger_flush_interval_s,
                             self.metrics.ledger_buffered.set, self.metrics.ledger_dropped.inc)
        # Upstreams, their breakers and live figures, and the routing rules over them.
        self.pool = UpstreamPool(config, on_checked=self._health_checked)
        self.breakers = {name: CircuitBreaker(name, config.circuit_breaker, self._breaker_changed)
                         for name in self.pool.states}
        self.live = LiveStats(config)
        self.executor = Executor(self.pool, self.breakers, Balancing(config, self.live, self.breakers))
        self.planner = Planner(config, self.live, self.breakers, budget_fraction=self.limiter.budget_used_fraction,
                               in_flight=lambda name: self.pool.states[name].in_flight)
        # Finalize: the record goes to the log and the ledger, then limits settle and routing learns.
        self.finalizer = Finalizer(config, self.metrics, RequestLog(config.server.request_log))
        self.finalizer.record_sinks.append(self.ledger.append)
        self.finalizer.observers += [self.limiter.settle, self._observe_latency]
        self.active: set[asyncio.Task[Any]] = set()  # requests being served (shutdown waits for their accounts)
        self._set_static_gauges()

    def _set_static_gauges(self) -> None:
        for name, m in self.config.models.items():
            self.metrics.model_info.labels(name, m.tier).set(1)
        for name in self.breakers:
            self.metrics.breaker_state.labels(name).set(0)
        for tenant, lim in self.config.features.tenant_limits.items():
            for period, budget in (("day", lim.budget_day), ("month", lim.budget_month)):
                if budget:
                    self.metrics.tenant_budget.labels(tenant, period).set(budget)

    def _redis_error(self, operation: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(operation).inc()
        now = time.monotonic()
        if now - self._redis_logged.get(operation, 0.0) >= 10.0:  # one line per operation per 10 s
            self._redis_logged[operation] = now
            log.warning("redis %s failed: %s: %s", operation, type(exc).__name__, exc)

    def _spend_seen(self, tenant: str, period: str, usd: float) -> None:
        self.metrics.tenant_spend.labels(tenant, period).set(usd)

    def _breaker_changed(self, deployment: str, state: BreakerState) -> None:
        log.warning("circuit breaker of %s is now %s", deployment, state.name.lower())
        self.metrics.breaker_state.labels(deployment).set(int(state))

    def _observe_latency(self, rec: RequestRecord) -> None:
        """Feed the deadline rule's live figures from successful requests."""
        if rec.status != 200 or rec.deployment is None:
            return
        if rec.stream:
            self.live.get(rec.deployment).observe(rec.ttft_s, rec.tpot_s)
        elif rec.completion_tokens > 0 and rec.endpoint != "embeddings":
            self.live.get(rec.deployment).observe(None, rec.upstream_s / rec.completion_tokens)

    def _health_checked(self, pool: UpstreamPool) -> None:
        for name, state in pool.states.items():
            self.metrics.upstream_healthy.labels(name).set(1 if state.healthy else 0)

    async def read_json(self, headers: dict[bytes, bytes], receive: Receive) -> Any:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise errors.payload_too_large(self.max_body)
        chunks: list[bytes] = []
        size = 0
        deadline: float | None = None
        while True:
            if deadline is None:
                message = await receive()  # usually the whole body: no timer needed
            else:
                try:
                    async with asyncio.timeout_at(deadline):  # a slow sender (slowloris) is cut off
                        message = await receive()
                except TimeoutError:
                    raise GatewayError(408, f"The request body did not arrive within {self.body_timeout:g}s.",
                                       code="request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise errors.payload_too_large(self.max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.body_timeout
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not raw:
            raise errors.bad_request("Request body is empty; expected a JSON object.")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise errors.bad_request(f"Request body is not valid JSON: {e.msg}", code="invalid_json") from None

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        """The request's path through the stages; answers through raw ASGI (no framework on the hot path)."""
        headers = _wanted_headers(scope["headers"])
        rid = headers.get(b"x-request-id")
        rec = RequestRecord(rid.decode() if rid and _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex, endpoint)
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        watcher: asyncio.Task[None] | None = None
        try:
            auth = headers.get(b"authorization")
            tenant, key_hash = self.auth.authenticate(auth.decode("latin-1") if auth else None)
            rec.tenant, rec.api_key_hash = tenant.name, key_hash
            body = await self.read_json(headers, receive)
            # From here on the client leaving cancels this task, wherever it is: limits, queue, vLLM, relay.
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, task))
            req = validate_request(endpoint, body)
            rec.requested_model = req.model
            plan = await self._plan(rec, req.model, body, headers)
            self.finalizer.begin(rec)
            model = plan.candidates[0]
            await self.limiter.admit(rec, model, body)  # 429 (or 503 when failing closed) refuses here
            stream = endpoint != "embeddings" and body.get("stream") is True
            n = body.get("n", 1) if endpoint != "embeddings" else 1
            lk = await self.cache.lookup(rec, model, endpoint, body, headers.get(b"cache-control"), stream)
            try:
                if stream:
                    await self._stream(rec, plan, endpoint, body, send, lk, n, watcher.cancel)
                    self.finalizer.finalize(rec)  # a stream that failed mid-way (a complete one already is)
                    return
                if lk.entry is not None:
                    data = lk.entry.body
                else:
                    data, tally = await self.executor.call(rec, plan, endpoint, body, n)
                    tally.write(rec)
                watcher.cancel()  # the answer is here: a client leaving now changes nothing
                rec.status = 200
                self.finalizer.finalize(rec)
                self.cache.store(lk, rec, "json", data)
            finally:
                self.cache.release(lk)
            await _respond(send, 200, data, final_headers(rec))
        except GatewayError as e:
            if watcher is not None:
                watcher.cancel()  # answering now: the end of the response must not look like the client leaving
            await self._error(rec, e, send)
        except ClientGone:
            rec.outcome, rec.status = "client_left_before_response", 499
            self.finalizer.finalize(rec)
        except asyncio.CancelledError:
            if watcher is None or not watcher.done() or watcher.cancelled():
                rec.outcome, rec.status = "gateway_shutdown", rec.status or 503  # cancelled from outside: stopping
                self.finalizer.finalize(rec)
                raise
            task.uncancel()  # our own watcher: the client left
            if not rec.outcome.startswith("client_left"):
                rec.outcome = "client_left_before_response"
            rec.status = 499
            self.finalizer.finalize(rec)
        except Exception:
            log.exception("internal error in request %s", rec.request_id)
            await self._error(rec, GatewayError(500, f"Internal gateway error (request id {rec.request_id}).",
                                                type="api_error", code="internal_error"), send)
        finally:
            self.active.discard(task)
            if watcher is not None:
                watcher.cancel()

    async def _error(self, rec: RequestRecord, e: GatewayError, send: Send) -> None:
        rec.status, rec.error_code = e.status, e.code
        rec.outcome = "timeout" if e.code == "upstream_timeout" else "error"
        self.finalizer.finalize(rec)
        await _respond(send, e.status, e.to_json(), {**final_headers(rec), **e.headers})

    async def _plan(self, rec: RequestRecord, name: str, body: dict[str, Any], headers: dict[bytes, bytes]) -> Plan:
        task_raw = headers.get(b"x-gateway-task")
        metadata = body.get("metadata")
        task = task_raw.decode("latin-1").strip().lower() if task_raw else (
            str(metadata["task"]).lower() if isinstance(metadata, dict) and metadata.get("task") else None)
        deadline_ms = None
        if (raw := headers.get(b"x-gateway-deadline-ms")) is not None:
            try:
                deadline_ms = float(raw)
                if not 0 < deadline_ms < 1e9:
                    raise ValueError
            except ValueError:
                raise errors.bad_request("Header x-gateway-deadline-ms must be a positive number of milliseconds.",
                                         param="x-gateway-deadline-ms") from None
        plan = await self.planner.plan(name, body, rec.tenant, task, deadline_ms, self.executor.count_tokens)
        rec.primary_model = plan.requested.name
        rec.route = plan.route.name if plan.route is not None else None
        rec.task = task
        rec.rule, rec.fallback_reason = plan.rule, plan.reason
        rec.route_decisions = plan.decisions
        rec.deadline_ms = None if plan.deadline_s is None else plan.deadline_s * 1e3
        rec.predicted_ms = None if plan.predicted_s is None else plan.predicted_s * 1e3
        return plan

    async def _stream(self, rec: RequestRecord, plan: Plan, endpoint: Endpoint, body: dict[str, Any],
                      send: Send, lk: Lookup, n: int, stop_watching: Callable[[], object]) -> None:
        rec.stream = True
        asked = body.get("stream_options") or {}
        if not isinstance(asked, dict):
            raise errors.bad_request("'stream_options' must be an object.", param="stream_options")
        # A miss that may be stored keeps the upstream payloads (RecordingAccountant); a hit replays them.
        acct_type = RecordingAccountant if lk.may_store else StreamAccountant
        acct = acct_type(rec, asked.get("include_usage") is True, asked.get("continuous_usage_stats") is True, n)
        body["stream_options"] = {**asked, "include_usage": True, "continuous_usage_stats": True}
        stream = None if lk.entry is not None else await self.executor.open_stream(rec, plan, endpoint, body, n)
        rec.status = 200

        def on_done() -> bytes:
            line = self.finalizer.finalize(rec)
            if isinstance(acct, RecordingAccountant):  # only called for a stream that completed
                self.cache.store(lk, rec, "sse", b"\n".join(acct.payloads))
            return stream_trailer(line)

        relay = None if stream is None else Relay(stream, rec, acct, on_done)
        chunks = relay.chunks() if relay is not None else replay(lk.entry, acct, on_done)  # type: ignore[arg-type]
        sending, t0 = False, 0.0
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": _encode_headers({**early_headers(rec), "cache-control": "no-cache"}, SSE)})
            async for chunk in chunks:
                sending, t0 = True, time.perf_counter()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                waited = time.perf_counter() - t0
                sending = False
                if waited > _BLOCKED_S:  # the client's socket was full: it is not keeping up
                    rec.client_wait_s += waited
            stop_watching()  # the response is complete: the client closing now is not leaving early
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if sending:  # left while a write to it was blocked
                rec.client_wait_s += time.perf_counter() - t0
            slow = sending or rec.client_wait_s >= _SLOW_READER_S
            rec.outcome = "client_left_slow_reader" if slow else "client_left_midstream"
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            if relay is not None:
                await relay.abandon()  # no-op when the upstream side already ended

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": m.owned_by,
             "root": m.deployments[0].upstream_model}
            for name, m in self.config.models.items()] + [
            {"id": name, "object": "model", "created": 0, "owned_by": "gateway-route",
             "root": r.candidates[0].name, "candidates": [c.name for c in r.candidates]}
            for name, r in self.config.routes.items()]}


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


_BLOCKED_S = 0.002  # a send that took longer waited for the client's socket to drain
_SLOW_READER_S = 0.05  # a client that held the stream back this long in all reads slowly

_WANTED = frozenset({b"authorization", b"x-request-id", b"content-length", b"x-gateway-task",
                     b"x-gateway-deadline-ms", b"cache-control"})
JSON_CT = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream; charset=utf-8")


def _wanted_headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {k: v for k, v in raw if k in _WANTED}


def _encode_headers(headers: dict[str, str], content_type: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [content_type, *((k.encode(), v.encode()) for k, v in headers.items())]


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    h = _encode_headers(headers, JSON_CT)
    h.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


class _Handled(Response):
    """Lets a FastAPI route hand its request to Gateway.handle (the same code the fast path runs)."""

    def __init__(self, gw: Gateway, endpoint: Endpoint) -> None:
        self.gw, self.endpoint = gw, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gw.handle(scope, receive, send, self.endpoint)


class FastPath:
    """ASGI entry: the three proxy routes go straight to Gateway.handle; everything else to FastAPI."""

    ROUTES: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                                   "/v1/embeddings": "embeddings"}

    def __init__(self, gw: Gateway, app: FastAPI) -> None:
        self.gw, self.app = gw, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.ROUTES.get(scope["path"])
            if endpoint is not None:
                await self.gw.handle(scope, receive, send, endpoint)
                return
        await self.app(scope, receive, send)


def create_app(config: GatewayConfig | None = None) -> FastPath:
    """Build the app; with no config, load the file named by GATEWAY_CONFIG (uvicorn --factory workers)."""
    if config is None:
        config = load_config(os.environ["GATEWAY_CONFIG"])
    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.pool.start()
        gw.live.start(gw.pool.session)
        await gw.store.start()
        await gw.ledger.start()
        try:
            yield
        finally:
            if gw.active:  # requests cut by shutdown are still draining vLLM and writing their records
                await asyncio.wait(list(gw.active), timeout=DRAIN_S + 1.0)
            await gw.live.close()
            await gw.pool.close()
            await gw.limiter.close()
            await gw.cache.close()
            await gw.ledger.close()  # writes what is still buffered, if the store answers
            await gw.store.close()
            gw.finalizer.request_log.close()

    app = FastAPI(title="vLLM gateway", version="0.1.0", lifespan=lifespan)
    install_openapi(app, [*config.models, *config.routes])
    app.state.gateway = gw

    # Served by FastPath without routing; declared here too so that they appear in the OpenAPI description.
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return _Handled(gw, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return _Handled(gw, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return _Handled(gw, "embeddings")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            gw.auth.authenticate(request.headers.get("authorization"))
        except GatewayError as e:
            return Response(e.to_json(), status_code=e.status, media_type=JSON)
        return Response(orjson.dumps(gw.list_models()), media_type=JSON)

    @app.get("/v1/usage")
    async def usage(request: Request) -> Response:
        """Totals by tenant, model and day from the ledger; a tenant sees its own, an admin key all."""
        try:
            tenant, _ = gw.auth.authenticate(request.headers.get("authorization"))
            q = request.query_params
            try:
                start, end = parse_time(q.get("start")), parse_time(q.get("end"))
            except ValueError:
                raise errors.bad_request("start and end must be unix seconds or ISO 8601 dates.") from None
            who = q.get("tenant") if tenant.admin else tenant.name
            try:
                await gw.ledger.flush()  # so that a caller sees its own latest requests
                totals = await gw.ledger.usage(start, end, who)
            except StoreUnavailable:
                raise GatewayError(503, "The usage ledger is unavailable right now.", type="api_error",
                                   code="ledger_unavailable") from None
        except GatewayError as e:
            return Response(e.to_json(), status_code=e.status, media_type=JSON)
        return Response(orjson.dumps(totals), media_type=JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/readyz", responses={503: {"description": "a model has no healthy deployment"}})
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

    return FastPath(gw, app)

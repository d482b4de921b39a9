"""The gateway's own HTTP endpoints (FastAPI): models, usage, health, readiness, metrics.

The proxied endpoints never reach FastAPI (app.py's FastPath hands them to the pipeline); they are
declared here only so that the OpenAPI description lists them.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway import errors
from gateway.apis.contract import PATHS
from gateway.errors import GatewayError, error_response
from gateway.guards import bearer_matches, credential, duplicate_header, duplicated
from gateway.ledger import parse_time
from gateway.metrics import CONTENT_TYPE
from gateway.pipeline import Gateway
from gateway.store import StoreCommandError, StoreUnavailable

JSON = "application/json"
router = APIRouter()


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


USAGE_TIME_MAX = 253402300799.0  # 9999-12-31T23:59:59Z: the last instant an ISO date can name


def _usage_time(value: str | None, name: str) -> float | None:
    """A /v1/usage bound: unix seconds or an ISO 8601 date, finite, from 1970 to 9999 (else 400 naming it)."""
    problem = f"{name} must be unix seconds (0 to {USAGE_TIME_MAX:.0f}) or an ISO 8601 date."
    if value is not None and len(value) > 64:
        raise errors.bad_request(problem, param=name)
    try:
        ts = parse_time(value)
    except (ValueError, OverflowError):
        raise errors.bad_request(problem, param=name) from None
    if ts is not None and not (0.0 <= ts <= USAGE_TIME_MAX):  # also refuses nan (every comparison is false)
        raise errors.bad_request(problem, param=name)
    return ts


def _authorization(request: Request) -> str | None:
    """A FastAPI route's credential, with the proxy routes' rules: each header once, one credential."""
    if (dup := duplicated(request.scope["headers"])) is not None:
        raise duplicate_header(dup)
    auth, key = request.headers.get("authorization"), request.headers.get("x-api-key")
    return credential(auth.encode("latin-1") if auth is not None else None,
                      key.encode("latin-1") if key is not None else None)



async def _never_reached(request: Request) -> Response:
    """The proxied paths are answered by app.FastPath before routing; this only documents them."""
    raise GatewayError(405, f"{request.method} {request.url.path} is served on POST only.", code="method_not_allowed")


for _path in PATHS:
    router.add_api_route(_path, _never_reached, methods=["POST"], name=_path.strip("/").replace("/", "_"))


@router.get("/v1/models")
async def models(request: Request) -> Response:
    gw = _gateway(request)
    try:
        gw.auth.authenticate(_authorization(request))
    except GatewayError as e:
        return error_response(e)
    return Response(orjson.dumps(gw.list_models()), media_type=JSON)


@router.get("/v1/usage")
async def usage(request: Request) -> Response:
    """Totals by tenant, model and day from the ledger; a tenant sees its own, an admin key all."""
    gw = _gateway(request)
    try:
        tenant, _ = gw.auth.authenticate(_authorization(request))
        q = request.query_params
        # Checked before anything reaches Redis: a bad value is this request's 400, never a store error.
        start, end = _usage_time(q.get("start"), "start"), _usage_time(q.get("end"), "end")
        if start is not None and end is not None and end < start:
            raise errors.bad_request("end must not be before start.", param="end")
        who = q.get("tenant") if tenant.admin else tenant.name
        if who is not None and len(who) > 256:
            raise errors.bad_request("tenant must be at most 256 characters.", param="tenant")
        try:
            await gw.ledger.flush()  # so that a caller sees its own latest requests
            totals = await gw.ledger.usage(start, end, who)
        except StoreCommandError:  # a bug (logged and counted by the store); limits stay on
            raise GatewayError(500, "The usage ledger could not be read.", type="api_error",
                               code="ledger_error") from None
        except StoreUnavailable:
            raise GatewayError(503, "The usage ledger is unavailable right now.", type="api_error",
                               code="ledger_unavailable") from None
    except GatewayError as e:
        return error_response(e)
    return Response(orjson.dumps(totals), media_type=JSON)


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


@router.get("/readyz", responses={503: {"description": "draining (SIGTERM), or a model has no healthy deployment"}})
async def readyz(request: Request) -> Response:
    if request.app.state.drain.draining:  # going away: load balancers stop sending (gateway/drain.py)
        return Response(b'{"ready":false,"draining":true}', status_code=503, media_type=JSON)
    ready = _gateway(request).pool.ready_models()
    ok = all(ready.values())
    return Response(orjson.dumps({"ready": ok, "models": ready}), status_code=200 if ok else 503, media_type=JSON)


@router.get("/metrics", responses={401: {"description": "server.metrics_key is set and was not sent"}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition; names tenants, spend and budgets, so server.metrics_key can guard it."""
    gw = _gateway(request)
    key = gw.config.server.metrics_key or None
    if key is not None:
        try:
            if not bearer_matches(_authorization(request), key):
                raise errors.unauthorized("/metrics needs the metrics key: 'Authorization: Bearer <key>'.")
        except GatewayError as e:
            return error_response(e, {"www-authenticate": "Bearer"} if e.status == 401 else None)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

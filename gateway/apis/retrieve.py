"""GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: sent to the engine that stores the response.

Each is one request record (endpoint responses.retrieve / responses.cancel) with no tokens: the usage
inside a stored response was billed when it was made.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING

import aiohttp
import orjson

from gateway import errors
from gateway.apis.stored import Location, not_found
from gateway.errors import GatewayError
from gateway.finalize import final_headers
from gateway.protocol import upstream_error
from gateway.record import Attempt, RequestRecord
from gateway.upstream import DeploymentState

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from gateway.pipeline import Gateway

PATH = re.compile(r"/v1/responses/([A-Za-z0-9_\-]{1,256})(/cancel)?")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def matches(path: str) -> bool:
    return path.startswith("/v1/responses/")


async def handle(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    from gateway.asgi import respond as _respond  # the one place that writes a JSON answer

    headers = dict(scope["headers"])
    rid = headers.get(b"x-request-id")
    m = PATH.fullmatch(scope["path"])
    cancel = m is not None and m.group(2) is not None
    rec = RequestRecord(rid.decode() if rid and _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex,
                        "responses.cancel" if cancel else "responses.retrieve")
    try:
        auth = headers.get(b"authorization")
        tenant, key_hash = gw.auth.authenticate(auth.decode("latin-1") if auth else None)
        rec.identity.tenant, rec.identity.api_key_hash = tenant.name, key_hash
        if m is None:
            raise GatewayError(404, f"{scope['method']} {scope['path']}: Not Found", code="not_found")
        if scope["method"] != ("POST" if cancel else "GET"):
            raise GatewayError(405, f"{scope['method']} {scope['path']}: Method Not Allowed",
                               code="method_not_allowed")
        if b"stream=true" in scope.get("query_string", b"").lower():
            raise errors.bad_request("Streaming a stored response is only possible for background responses, "
                                     "which this gateway does not accept.", param="stream")
        response_id = m.group(1)
        loc = await gw.apis.locator.locate(response_id, tenant.name)
        state = _engine(gw, loc, response_id)
        rec.identity.requested_model = rec.routing.served_model = loc.model
        rec.routing.deployment, rec.routing.upstream_model = state.name, state.spec.upstream_model
        data = await _forward(gw, rec, state, response_id, cancel)
        rec.end.status = 200
        gw.finalizer.finalize(rec)
        await _respond(send, 200, data, final_headers(rec))
    except GatewayError as e:
        rec.end.status, rec.end.error_code, rec.end.outcome = e.status, e.code, "error"
        gw.finalizer.finalize(rec)
        await _respond(send, e.status, e.to_json(), {**final_headers(rec), **e.headers})


def _engine(gw: Gateway, loc: Location, response_id: str) -> DeploymentState:
    """The deployment that made it, or another deployment on the same engine URL (a renamed one)."""
    state = gw.pool.states.get(loc.deployment)
    if state is not None and state.spec.url == loc.url:
        return state
    for s in gw.pool.states.values():
        if s.spec.url == loc.url:
            return s
    raise GatewayError(409, f"Response '{response_id}' is stored on deployment '{loc.deployment}', which is no "
                       "longer configured.", param="response_id", code="stored_response_deployment_gone")


async def _forward(gw: Gateway, rec: RequestRecord, state: DeploymentState, response_id: str, cancel: bool) -> bytes:
    url = f"{state.spec.url}/v1/responses/{response_id}" + ("/cancel" if cancel else "")
    t0 = time.perf_counter()
    outcome = "ok"
    try:
        async with gw.pool.session.request("POST" if cancel else "GET", url, timeout=state.timeout,
                                           headers={**state.headers, "X-Request-Id": rec.identity.request_id}) as resp:
            data = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as e:
        outcome = "connect_error"
        raise GatewayError(503, f"Response '{response_id}' is stored on deployment '{state.name}', which cannot "
                           f"answer now ({type(e).__name__}).", type="api_error",
                           code="stored_response_unavailable") from None
    finally:
        rec.timing.upstream_s += time.perf_counter() - t0
        rec.routing.attempts.append(Attempt(state.name, state.spec.upstream_model, outcome, time.perf_counter() - t0))
    if status == 404:
        raise not_found(response_id, f" on deployment '{state.name}' (vLLM keeps stored responses in memory: "
                        "the engine may have restarted, or it runs without VLLM_ENABLE_RESPONSES_API_STORE=1)")
    if status >= 400:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        raise upstream_error(status, payload, state.name)
    return data

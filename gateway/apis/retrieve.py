"""GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: sent to the engine that stores the response.

They run through the same pipeline as every proxied request (gateway/pipeline.py: authentication with
the duplicate-credential check, limits, one record, the error shape, the catch-all 500); this module is
only their own stage: which response, and the call to its engine. Each is one request record (endpoint
responses.retrieve / responses.cancel) with no tokens: the usage inside a stored response was billed
when it was made.
"""

from __future__ import annotations

import re
import time

import aiohttp
import orjson
from starlette.types import Scope

from gateway import errors
from gateway.apis.stored import Location, not_found
from gateway.errors import GatewayError
from gateway.protocol import upstream_error
from gateway.record import Attempt, RequestRecord
from gateway.upstream import DeploymentState, UpstreamPool

PREFIX = "/v1/responses/"
PATH = re.compile(r"/v1/responses/([A-Za-z0-9_\-]{1,256})(/cancel)?")


def endpoint_of(path: str) -> str | None:
    """The endpoint a stored-response path belongs to (None: not one of ours)."""
    if not path.startswith(PREFIX):
        return None
    return "responses.cancel" if path.endswith("/cancel") else "responses.retrieve"


def response_id(scope: Scope, method: str) -> str:
    """The response id the path names; 404 / 405 / 400 for what this gateway does not serve."""
    m = PATH.fullmatch(scope["path"])
    if m is None:
        raise GatewayError(404, f"{scope['method']} {scope['path']}: Not Found", code="not_found")
    if scope["method"] != method:
        raise GatewayError(405, f"{scope['method']} {scope['path']}: Method Not Allowed", code="method_not_allowed")
    if b"stream=true" in scope.get("query_string", b"").lower():
        raise errors.bad_request("Streaming a stored response is only possible for background responses, "
                                 "which this gateway does not accept.", param="stream")
    return m.group(1)


def engine(pool: UpstreamPool, loc: Location, rid: str) -> DeploymentState:
    """The deployment that made it, or another deployment on the same engine URL (a renamed one)."""
    state = pool.states.get(loc.deployment)
    if state is not None and state.spec.url == loc.url:
        return state
    for s in pool.states.values():
        if s.spec.url == loc.url:
            return s
    raise GatewayError(409, f"Response '{rid}' is stored on deployment '{loc.deployment}', which is no "
                       "longer configured.", param="response_id", code="stored_response_deployment_gone")


async def forward(pool: UpstreamPool, rec: RequestRecord, state: DeploymentState, rid: str, path: str,
                  method: str) -> bytes:
    """The engine's answer about stored response `rid` (`path`: the contract's, with {response_id})."""
    rec.routing.deployment, rec.routing.upstream_model = state.name, state.spec.upstream_model
    url = state.spec.url + path.format(response_id=rid)
    t0 = time.perf_counter()
    outcome = "ok"
    try:
        async with pool.session.request(method, url, timeout=state.timeout,
                                        headers={**state.headers, "X-Request-Id": rec.identity.request_id}) as resp:
            data = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as e:
        outcome = "connect_error"
        raise GatewayError(503, f"Response '{rid}' is stored on deployment '{state.name}', which cannot "
                           f"answer now ({type(e).__name__}).", type="api_error",
                           code="stored_response_unavailable") from None
    finally:
        rec.timing.upstream_s += time.perf_counter() - t0
        rec.routing.attempts.append(Attempt(state.name, state.spec.upstream_model, outcome, time.perf_counter() - t0))
    if status == 404:
        raise not_found(rid, f" on deployment '{state.name}' (vLLM keeps stored responses in memory: "
                        "the engine may have restarted, or it runs without VLLM_ENABLE_RESPONSES_API_STORE=1)")
    if status >= 400:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        raise upstream_error(status, payload, state.name)
    return data

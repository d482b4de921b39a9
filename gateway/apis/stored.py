"""Stored responses: which deployment holds which response id, and requests that must go back to it.

vLLM keeps a stored response (and the conversation behind it) in the memory of the engine that made
it, so `GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel` and a request naming it as
`previous_response_id` must reach that same engine. The gateway names every response itself and
remembers id -> (deployment, engine URL, tenant, model): in Redis when configured (shared by all
replicas, with a TTL), otherwise in a bounded in-process table. What happens when that engine is gone
is an error naming the problem, never an answer from another engine:
- id unknown (never made here, expired, or another tenant's): 404 response_not_found;
- its engine is no longer in the config, or the model asked for does not run there: 409;
- its engine does not answer: 503 stored_response_unavailable (no fallback);
- its engine answers 404 (restarted: vLLM's store is in memory): 404 response_not_found.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError
from gateway.routing.policy import Plan
from gateway.store import Store, StoreUnavailable

log = logging.getLogger("gateway.stored")

KEY_PREFIX = "resp:"  # inside the store's cache keyspace; cache keys are hex digests, so no clash


@dataclass(frozen=True, slots=True)
class Location:
    deployment: str
    url: str
    tenant: str
    model: str
    # The stored conversation's size as vLLM counted it (its prompt + output): a continuation makes vLLM
    # prefill all of it again, so admission reserves it. None while the response is still being made (or
    # for an entry written before this field existed): the model's context window bounds it then.
    context_tokens: int | None = None

    def encode(self) -> bytes:
        return orjson.dumps([self.deployment, self.url, self.tenant, self.model, self.context_tokens])

    @classmethod
    def decode(cls, raw: bytes) -> Location:
        d, u, t, m, *rest = orjson.loads(raw)
        ctx = rest[0] if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool) else None
        return cls(d, u, t, m, ctx)


def not_found(response_id: str, detail: str = "") -> GatewayError:
    return GatewayError(404, f"Response '{response_id}' not found{detail}.", param="response_id",
                        code="response_not_found")


class ResponseLocator:
    """Response id -> Location; Redis (TTL) when the store is Redis, else in-process (bounded, TTL)."""

    def __init__(self, store: Store, ttl_s: float, max_local: int = 100_000) -> None:
        self.store = store if getattr(store, "name", "") == "redis" else None
        self.ttl_s = ttl_s
        self.max_local = max_local
        self._local: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    async def remember(self, response_id: str, loc: Location) -> None:
        raw = loc.encode()
        if self.store is None:
            self._local[response_id] = (raw, time.monotonic() + self.ttl_s)
            self._local.move_to_end(response_id)
            while len(self._local) > self.max_local:
                self._local.popitem(last=False)
            return
        try:
            await self.store.cache_put(KEY_PREFIX + response_id, raw, self.ttl_s)
        except StoreUnavailable:
            # The answer was made and is on its way; only continuing it later will fail (404, named).
            log.warning("could not remember where response %s is stored (store unavailable)", response_id)

    async def find(self, response_id: str) -> Location | None:
        if self.store is None:
            hit = self._local.get(response_id)
            if hit is None or hit[1] < time.monotonic():
                return None
            return Location.decode(hit[0])
        try:
            raw = await self.store.cache_get(KEY_PREFIX + response_id)
        except StoreUnavailable:
            raise GatewayError(503, f"Cannot look up where response '{response_id}' is stored right now "
                               "(store unavailable).", type="api_error", code="stored_response_unavailable") from None
        return None if raw is None else Location.decode(raw)

    async def locate(self, response_id: str, tenant: str) -> Location:
        loc = await self.find(response_id)
        if loc is None or loc.tenant != tenant:  # another tenant's id is as unknown as a made-up one
            raise not_found(response_id, " (it was not made through this gateway, or it expired)")
        return loc


def pin_to_engine(plan: Plan, response_id: str, loc: Location, configured_urls: set[str]) -> None:
    """Narrow the plan to the deployments on the engine that holds `response_id`; no other may answer."""
    narrowed = []
    for model in plan.candidates:
        same_engine = tuple(d for d in model.deployments if d.url == loc.url)
        if same_engine:
            narrowed.append(dataclasses.replace(model, deployments=same_engine))
    if not narrowed:
        if loc.url not in configured_urls:
            raise GatewayError(409, f"Response '{response_id}' is stored on deployment '{loc.deployment}', which is "
                               "no longer configured; it cannot be continued on another engine.",
                               param="previous_response_id", code="stored_response_deployment_gone")
        raise GatewayError(409, f"Response '{response_id}' is stored on deployment '{loc.deployment}' (model "
                           f"'{loc.model}'), which '{plan.name}' does not use; continue it with model '{loc.model}'.",
                           param="previous_response_id", code="stored_response_other_model")
    plan.candidates = narrowed
    plan.decisions.append(f"stored_response: {response_id} lives on {loc.deployment}")


def unavailable(response_id: str, loc: Location, cause: GatewayError) -> GatewayError:
    return GatewayError(503, f"Response '{response_id}' is stored on deployment '{loc.deployment}', which cannot "
                        f"answer now ({cause.message}); it cannot be continued on another engine.",
                        type="api_error", code="stored_response_unavailable")

"""What the request path asks of each API, by endpoint: usage reader, stream accountant, error shape, hooks.

Chat, completions and embeddings keep the defaults of gateway/streaming.py and gateway/errors.py; the
Responses and Messages APIs and the tokenizer pass-through plug in here, so that app.py and execute.py
only look an endpoint up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.apis import messages, responses
from gateway.apis.events import EventAccountant
from gateway.apis.stored import Location, ResponseLocator, pin_to_engine, unavailable
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.routing.policy import Plan
from gateway.store import Store
from gateway.streaming import take_usage

STORED_RESPONSE_TTL_S = 7 * 86400.0  # vLLM itself never evicts a stored response; an engine restart loses them

UsageReader = Callable[[RequestRecord, Any], None]

USAGE_READERS: dict[str, UsageReader] = {"responses": responses.take_usage, "messages": messages.take_usage}
ERROR_BODIES: dict[str, Callable[[GatewayError], bytes]] = {"messages": messages.error_body}
ACCOUNTANTS: dict[str, type[EventAccountant]] = {"responses": responses.ResponsesAccountant,
                                                 "messages": messages.MessagesAccountant}
FIRST_OUTPUT: dict[str, Callable[[Any], bool]] = {"responses": responses.first_output,
                                                  "messages": messages.first_output}
UNBILLED = frozenset({"tokenize", "detokenize"})  # pass-through: counted as requests, no tokens, never cached


def usage_reader(endpoint: str) -> UsageReader:
    return USAGE_READERS.get(endpoint, take_usage)


def error_body(endpoint: str, err: GatewayError) -> bytes:
    fmt = ERROR_BODIES.get(endpoint)
    return err.to_json() if fmt is None else fmt(err)


def accountant(endpoint: str, rec: RequestRecord, keep_payloads: bool) -> EventAccountant | None:
    cls = ACCOUNTANTS.get(endpoint)
    return None if cls is None else cls(rec, keep_payloads)


def streams(endpoint: str, body: dict[str, Any]) -> bool:
    return endpoint not in UNBILLED and endpoint != "embeddings" and bool(body.get("stream"))


class Apis:
    """The stateful part: stored responses (where each lives) and the output upper bound."""

    def __init__(self, config: GatewayConfig, store: Store, ttl_s: float = STORED_RESPONSE_TTL_S) -> None:
        self.default_max_tokens = config.features.limits.default_max_tokens
        self.locator = ResponseLocator(store, ttl_s)
        self.urls = {d.name: d.url for m in config.models.values() for d in m.deployments}
        self.configured_urls = set(self.urls.values())

    def prepare(self, endpoint: str, body: dict[str, Any]) -> None:
        """Before admission: what the gateway sets in the body (the output upper bound, the response id)."""
        if endpoint == "responses":
            responses.prepare(body, self.default_max_tokens)

    async def pin(self, rec: RequestRecord, endpoint: str, plan: Plan, body: dict[str, Any]) -> Location | None:
        """A request that continues a stored response may only go to the engine that holds it."""
        prev = body.get("previous_response_id") if endpoint == "responses" else None
        if not isinstance(prev, str):
            return None
        loc = await self.locator.locate(prev, rec.tenant)
        pin_to_engine(plan, prev, loc, self.configured_urls)
        rec.route_decisions = plan.decisions
        return loc

    @staticmethod
    def pinned_failure(body: dict[str, Any], loc: Location | None, err: GatewayError) -> GatewayError:
        """A pinned request whose engine failed: say so (there is no other engine to try)."""
        if loc is None or err.status < 500:
            return err
        return unavailable(str(body.get("previous_response_id")), loc, err)

    async def served(self, rec: RequestRecord, endpoint: str, body: dict[str, Any]) -> None:
        """After an engine accepted the request: remember where a stored response lives."""
        if endpoint != "responses" or not responses.wants_store(body) or rec.deployment is None:
            return
        response_id = body.get("request_id")
        if isinstance(response_id, str):
            await self.locator.remember(response_id, Location(rec.deployment, self.urls[rec.deployment], rec.tenant,
                                                              rec.served_model or ""))

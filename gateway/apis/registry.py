"""What the request path asks of each API, by endpoint: usage reader, stream accountant, error shape, hooks.

Chat, completions and embeddings keep the defaults of gateway/streaming.py and gateway/errors.py; the
Responses and Messages APIs and the tokenizer pass-through plug in here, so that app.py and execute.py
only look an endpoint up.
"""

from __future__ import annotations

import contextlib
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
from gateway.streaming import AbsurdUsage, MalformedStream, UsageTally, tally_body
from gateway.upstream import UpstreamPool

STORED_RESPONSE_TTL_S = 7 * 86400.0  # vLLM itself never evicts a stored response; an engine restart loses them

BODY_USAGE: dict[str, Callable[[Any], dict[str, Any] | None]] = {"responses": responses.body_usage,
                                                                  "messages": messages.body_usage}
ERROR_BODIES: dict[str, Callable[[GatewayError], bytes]] = {"messages": messages.error_body}
ACCOUNTANTS: dict[str, type[EventAccountant]] = {"responses": responses.ResponsesAccountant,
                                                 "messages": messages.MessagesAccountant}
FIRST_OUTPUT: dict[str, Callable[[Any], bool]] = {"responses": responses.first_output,
                                                  "messages": messages.first_output}
UNBILLED = frozenset({"tokenize", "detokenize"})  # pass-through: counted as requests, no tokens, never cached


def tally_response(endpoint: str, body: Any, n: int) -> UsageTally:
    """The usage of a non-streaming answer, as the tally the record is written from."""
    read = BODY_USAGE.get(endpoint)
    if read is None:
        return tally_body(body, n)
    tally = UsageTally(1)
    usage = read(body)
    if usage is not None:
        with contextlib.suppress(AbsurdUsage):
            tally.add_body(usage)
    return tally


def tally_stream_lines(endpoint: str, lines: list[bytes]) -> UsageTally | None:
    """What an abandoned attempt's events say vLLM did (None: the endpoint is chat-shaped, not ours)."""
    cls = ACCOUNTANTS.get(endpoint)
    if cls is None:
        return None
    acct = cls(RequestRecord("attempt", endpoint))
    for line in lines:
        with contextlib.suppress(MalformedStream):
            acct.on_data(line[5:].strip())
    return acct.tally


def first_output(endpoint: str) -> Callable[[Any], bool] | None:
    """For a named-event stream: the predicate that ends the hold-back before the first token."""
    return FIRST_OUTPUT.get(endpoint)


def error_body(endpoint: str, err: GatewayError) -> bytes:
    fmt = ERROR_BODIES.get(endpoint)
    return err.to_json() if fmt is None else fmt(err)


def accountant(endpoint: str, rec: RequestRecord, keep_payloads: bool) -> EventAccountant | None:
    cls = ACCOUNTANTS.get(endpoint)
    return None if cls is None else cls(rec, keep_payloads)


def streams(endpoint: str, body: dict[str, Any]) -> bool:
    return endpoint not in UNBILLED and endpoint != "embeddings" and body.get("stream") is True


class Apis:
    """The stateful part: stored responses (where each lives) and the output upper bound."""

    def __init__(self, config: GatewayConfig, store: Store, ttl_s: float = STORED_RESPONSE_TTL_S) -> None:
        self.locator = ResponseLocator(store, ttl_s)
        self.urls = {d.name: d.url for m in config.models.values() for d in m.deployments}
        self.configured_urls = set(self.urls.values())

    def prepare(self, endpoint: str, body: dict[str, Any]) -> None:
        """Before admission: what the gateway sets in the body (the response id of a Responses request)."""
        if endpoint == "responses":
            responses.prepare(body)

    async def pin(self, rec: RequestRecord, endpoint: str, plan: Plan, body: dict[str, Any]) -> Location | None:
        """A request that continues a stored response may only go to the engine that holds it."""
        prev = body.get("previous_response_id") if endpoint == "responses" else None
        if not isinstance(prev, str):
            return None
        loc = await self.locator.locate(prev, rec.identity.tenant)
        pin_to_engine(plan, prev, loc, self.configured_urls)
        rec.routing.route_decisions = plan.decisions
        return loc

    @staticmethod
    def pinned_failure(body: dict[str, Any], loc: Location | None, err: GatewayError) -> GatewayError:
        """A pinned request whose engine failed: say so (there is no other engine to try)."""
        if loc is None or err.status < 500:
            return err
        return unavailable(str(body.get("previous_response_id")), loc, err)

    async def unfinished_stream(self, rec: RequestRecord, endpoint: str, body: dict[str, Any], acct: Any,
                                pool: UpstreamPool) -> None:
        """A Responses stream that ended before its usage (client gone, upstream dead): vLLM prefilled the
        prompt, but no event said how long it was. Count it, so that leaving early never makes it free."""
        if (endpoint != "responses" or not isinstance(acct, responses.ResponsesAccountant) or acct.tally.final
                or acct.deltas == 0 or rec.routing.deployment is None):
            return
        prompt = await responses.count_prompt(pool.session, pool.states[rec.routing.deployment], body)
        if prompt is not None:
            acct.prompt = prompt
            acct.add_usage({"prompt_tokens": prompt, "completion_tokens": acct.deltas}, final=False)
            acct.tally.write(rec)

    async def served(self, rec: RequestRecord, endpoint: str, body: dict[str, Any]) -> None:
        """After an engine accepted the request: remember where a stored response lives."""
        deployment = rec.routing.deployment
        if endpoint != "responses" or not responses.wants_store(body) or deployment is None:
            return
        response_id = body.get("request_id")
        if isinstance(response_id, str):
            await self.locator.remember(response_id, Location(deployment, self.urls[deployment], rec.identity.tenant,
                                                              rec.routing.served_model or ""))

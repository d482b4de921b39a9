"""Endpoint state the request path needs beyond the contracts: stored responses, and usage-less endings.

What each endpoint IS (schema, prompt rendering, output fields, usage readers, accountant) is its
contract (gateway/apis/contract.py); this module holds what needs state or I/O: where each stored
response lives and how large its conversation is, and the prompt count of a stream that ended before
vLLM reported it (a client gone from a Responses stream, a `response.completed` without usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import orjson

from gateway.apis import responses
from gateway.apis.contract import EndpointContract, contract_of
from gateway.apis.events import EventAccountant
from gateway.apis.stored import Location, ResponseLocator, pin_to_engine, unavailable
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.prompt_tokens import BYTE_BOUND, Conversation, PromptCounter
from gateway.record import RequestRecord
from gateway.routing.policy import Plan
from gateway.store import Store
from gateway.streaming import MalformedStream, UsageTally
from gateway.upstream import DeploymentState, UpstreamPool

log = logging.getLogger("gateway.apis")

STORED_RESPONSE_TTL_S = 7 * 86400.0  # vLLM itself never evicts a stored response; an engine restart loses them
COUNT_TIMEOUT_S = 2.0
_HEAD = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]  # a stand-in stored turn


def tally_stream_lines(contract: EndpointContract, lines: list[bytes]) -> UsageTally | None:
    """What an abandoned attempt's events say vLLM did (None: the endpoint is chat-shaped)."""
    if contract.accountant is None:
        return None
    acct = contract.accountant(RequestRecord("attempt", contract.name))
    for line in lines:
        with contextlib.suppress(MalformedStream):
            acct.on_data(line[5:].strip())
    return acct.tally


def accountant(contract: EndpointContract, rec: RequestRecord, keep_payloads: bool,
               max_bytes: int) -> EventAccountant | None:
    cls = contract.accountant
    return None if cls is None else cls(rec, keep_payloads, max_bytes)


class Apis:
    """The stateful part: stored responses (where each lives, how large) and usage-less prompt counts."""

    def __init__(self, config: GatewayConfig, store: Store, counters: dict[str, PromptCounter] | None = None,
                 ttl_s: float = STORED_RESPONSE_TTL_S) -> None:
        self.locator = ResponseLocator(store, ttl_s)
        self.urls = {d.name: d.url for m in config.models.values() for d in m.deployments}
        self.configured_urls = set(self.urls.values())
        self.counters = counters or {}

    def prepare(self, contract: EndpointContract, body: dict[str, Any]) -> None:
        """Before admission: what the gateway sets in the body (the response id of a stored response)."""
        if contract.stores_responses:
            responses.prepare(body)

    async def pin(self, rec: RequestRecord, contract: EndpointContract, plan: Plan,
                  body: dict[str, Any]) -> Location | None:
        """A request that continues a stored response may only go to the engine that holds it."""
        prev = body.get("previous_response_id") if contract.stores_responses else None
        if not isinstance(prev, str):
            return None
        loc = await self.locator.locate(prev, rec.identity.tenant)
        pin_to_engine(plan, prev, loc, self.configured_urls)
        rec.routing.route_decisions = plan.decisions
        return loc

    @staticmethod
    def stored_context(loc: Location | None, window: int | None) -> int:
        """Tokens of the stored conversation a continuation makes vLLM prefill again (reserved by admit):
        its size as vLLM counted it, or, while unknown, the context window (nothing larger fits)."""
        if loc is None:
            return 0
        if loc.context_tokens is not None:
            return loc.context_tokens
        return window or 0

    @staticmethod
    def pinned_failure(body: dict[str, Any], loc: Location | None, err: GatewayError) -> GatewayError:
        """A pinned request whose engine failed: say so (there is no other engine to try)."""
        if loc is None or err.status < 500:
            return err
        return unavailable(str(body.get("previous_response_id")), loc, err)

    async def served(self, rec: RequestRecord, contract: EndpointContract, body: dict[str, Any],
                     finished: bool) -> None:
        """An engine accepted the request (finished=False) or it ended (True): remember where a stored
        response lives and, once vLLM reported it, how large its conversation is."""
        deployment = rec.routing.deployment
        response_id = body.get("request_id")
        if (not contract.stores_responses or not responses.wants_store(body) or deployment is None
                or not isinstance(response_id, str)):
            return
        u = rec.usage
        size = u.prompt_tokens + u.completion_tokens if finished and u.usage_reported else None
        if finished and size is None:
            return  # what was remembered at the start (size unknown: bounded by the window) stays
        await self.locator.remember(response_id, Location(deployment, self.urls[deployment], rec.identity.tenant,
                                                          rec.routing.served_model or "", size))

    async def unfinished_stream(self, rec: RequestRecord, contract: EndpointContract, body: dict[str, Any],
                                acct: Any, pool: UpstreamPool, loc: Location | None) -> None:
        """A stream that ended before vLLM reported its prompt (client gone, upstream dead, a terminal
        event without usage): vLLM prefilled it, so it is counted here as vLLM renders it, the whole
        conversation included. Leaving early never makes a prompt free, and never bills more."""
        if (contract.prompt_in_stream or not isinstance(acct, EventAccountant) or acct.usage_final
                or acct.prompt_known or acct.deltas == 0 or rec.routing.deployment is None):
            return
        state = pool.states[rec.routing.deployment]
        counter = self.counters.get(rec.routing.served_model or "", BYTE_BOUND)
        prompt = await self._count_prompt(contract, body, loc, state, counter, pool.session)
        if prompt is None:
            log.warning("request %s: the prompt of a stream that ended early could not be counted",
                        rec.identity.request_id)
            return
        acct.prompt = prompt
        acct.add_usage({"prompt_tokens": prompt, "completion_tokens": acct.deltas}, final=False)
        acct.tally.write(rec)
        rec.usage.usage_reported = False  # counted by the gateway, not reported by vLLM

    async def usage_less_answer(self, rec: RequestRecord, contract: EndpointContract, body: dict[str, Any],
                                pool: UpstreamPool, loc: Location | None) -> None:
        """A complete answer without usage (an engine that did not report it): vLLM prefilled the prompt,
        so it is counted as vLLM renders it; the output is unknown (0) and the record says neither came
        from vLLM (usage_reported false)."""
        if not contract.billed or rec.usage.usage_reported or rec.routing.deployment is None:
            return
        state = pool.states[rec.routing.deployment]
        counter = self.counters.get(rec.routing.served_model or "", BYTE_BOUND)
        prompt = await self._count_prompt(contract, body, loc, state, counter, pool.session)
        if prompt is not None:
            rec.usage.prompt_tokens, rec.usage.usage_reported = prompt, False

    async def _count_prompt(self, contract: EndpointContract, body: dict[str, Any], loc: Location | None,
                            state: DeploymentState, counter: PromptCounter,
                            session: aiohttp.ClientSession) -> int | None:
        conv = contract.conversation(body)
        prev = body.get("previous_response_id")
        try:
            async with asyncio.timeout(COUNT_TIMEOUT_S):
                if not isinstance(prev, str):
                    n = counter.exact(conv)
                    if n is not None:
                        return n
                    if conv.messages is None:  # raw prompts (completions, embeddings): each counted by vLLM
                        counts = [await _tokenize_prompt(session, state, t) for t in conv.texts or ()]
                        return None if None in counts else sum(c for c in counts if c is not None)
                    return await _tokenize(session, state, conv.messages, conv.tools, True)
                # A continuation: vLLM renders the stored conversation, its output, then the new input (a new
                # `instructions` replaces the stored one at the top, so it is not counted again).
                stored = loc.context_tokens if loc is not None else None
                if stored is None:
                    stored = await _stored_size(session, state, prev)
                new = Conversation(messages=[m for m in conv.messages or [] if m.get("role") != "system"],
                                   tools=conv.tools)
                delta = counter.exact_continuation(new)
                if delta is None:
                    full = await _tokenize(session, state, [*_HEAD, *(new.messages or [])], new.tools, True)
                    head = await _tokenize(session, state, _HEAD, new.tools, False)
                    delta = None if full is None or head is None else max(0, full - head)
                return None if stored is None or delta is None else stored + delta
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.warning("could not count the prompt of an unfinished stream on %s", state.name)
            return None


async def _tokenize(session: aiohttp.ClientSession, state: DeploymentState, messages: list[dict[str, Any]],
                    tools: list[Any] | None, generation_prompt: bool) -> int | None:
    """vLLM's own count of chat messages (its /tokenize renders them with the model's template)."""
    req: dict[str, Any] = {"model": state.spec.upstream_model, "messages": messages,
                           "add_generation_prompt": generation_prompt}
    if tools:
        req["tools"] = tools
    async with session.post(f"{state.spec.url}/tokenize", data=orjson.dumps(req),
                            headers={**state.headers, "Content-Type": "application/json"}) as r:
        count = orjson.loads(await r.read()).get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


async def _tokenize_prompt(session: aiohttp.ClientSession, state: DeploymentState, text: str | list[int]) -> int | None:
    if isinstance(text, list):
        return len(text)
    req = {"model": state.spec.upstream_model, "prompt": text}
    async with session.post(f"{state.spec.url}/tokenize", data=orjson.dumps(req),
                            headers={**state.headers, "Content-Type": "application/json"}) as r:
        count = orjson.loads(await r.read()).get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


async def _stored_size(session: aiohttp.ClientSession, state: DeploymentState, response_id: str) -> int | None:
    async with session.get(f"{state.spec.url}/v1/responses/{response_id}", headers=state.headers) as r:
        usage = orjson.loads(await r.read()).get("usage") or {}
    size = int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)
    return size or None


__all__ = ["Apis", "accountant", "contract_of", "tally_stream_lines"]

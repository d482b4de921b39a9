"""Execute stage: pick a deployment, call vLLM, fall back to the next deployment before the first byte.

A failure before anything reached the client (connection refused or timed out, 5xx, an error event or a
timeout before the first token) moves the request to the next deployment in the plan; once a stream has
started it cannot. Every attempt is recorded with what vLLM did for it: an abandoned stream is drained
(gateway/relay.py), so the work a fallback or a timeout threw away is counted as waste, not lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import orjson

from gateway import errors
from gateway.apis import registry
from gateway.apis.contract import contract_of
from gateway.config import Model
from gateway.errors import GatewayError
from gateway.fair_queue import FairQueue, Ticket
from gateway.priority import write_priority
from gateway.protocol import Endpoint
from gateway.record import Attempt, RequestRecord
from gateway.relay import UpstreamStream, open_upstream_stream, tally_lines, trace_headers
from gateway.routing.adapters import AdapterPlacement, Lease
from gateway.routing.balance import Balancing
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.routing.policy import Plan
from gateway.streaming import UsageTally
from gateway.upstream import DeploymentState, UpstreamPool
from gateway.upstream_errors import Retryable, not_connected, refused

T = TypeVar("T")
log = logging.getLogger("gateway.execute")
JSON = "application/json"


class Executor:
    def __init__(self, pool: UpstreamPool, breakers: dict[str, CircuitBreaker],
                 balancing: Balancing | None = None, queues: dict[str, FairQueue] | None = None,
                 adapters: AdapterPlacement | None = None) -> None:
        self.pool = pool
        self.breakers = breakers
        self.balancing = balancing or Balancing(pool.config)
        self.adapters = adapters or AdapterPlacement(pool.config, pool)
        self.queue_timeout = pool.config.server.queue_timeout
        self.queues = queues or {}  # deployments with a fair queue (gateway/fair_queue.py); others: a semaphore

    def order(self, model: Model, body: dict[str, Any] | None = None,
              rec: RequestRecord | None = None) -> list[DeploymentState]:
        """The model's deployments in the order to try them, as its balance policy decides (routing/balance.py).

        LoRA affinity follows from the config: an adapter is a model whose deployments are the vLLM
        servers that load it, so its requests never reach a server without the adapter. A catalogue
        adapter (loaded on demand) goes first to the engines that hold it (routing/adapters.py).
        """
        states = self.balancing.order(model, [self.pool.states[d.name] for d in model.deployments], body, rec)
        return states if model.adapter is None else self.adapters.order(model, states)

    async def _acquire(self, state: DeploymentState, rec: RequestRecord, att: Attempt,
                       payload: bytes, body: dict[str, Any], span: Any = None) -> Callable[[], None]:
        """Wait for a slot on the deployment; returns the call that gives it back."""
        queue = self.queues.get(state.name)
        if queue is not None:
            return await self._acquire_fair(queue, state, rec, att, payload, body, span)
        await self._acquire_slot(state, rec, att, span)
        return state.slots.release

    async def _acquire_fair(self, queue: FairQueue, state: DeploymentState, rec: RequestRecord, att: Attempt,
                            payload: bytes, body: dict[str, Any], span: Any = None) -> Callable[[], None]:
        # The charge is prompt + output bound: the prompt from its bytes (~4 a token), corrected at finalize.
        bound = next((v for f in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                      if isinstance(v := body.get(f), int)), 0)
        prio = rec.routing.priority if rec.routing.priority is not None else 0
        ticket = Ticket(rec.identity.tenant, prio, len(payload) / 4 + bound)
        await self._wait_queued(queue.acquire(ticket), rec, att, span,
                                f"deployment {state.name} is saturated and this request was not released from its "
                                f"fair queue within {self.queue_timeout:g}s")
        att.fair_charge = ticket.charged
        return lambda: queue.release(ticket, None)

    async def _wait_queued(self, wait: Awaitable[Any], rec: RequestRecord, att: Attempt, span: Any,
                           overloaded: str) -> None:
        """Wait in a deployment's queue (its slots or its fair queue): the wait is queue time, traced, bounded by
        server.queue_timeout (then a retryable 503 naming why)."""
        t0 = time.perf_counter()
        queued = rec.trace.queue(span) if rec.trace is not None else None
        try:
            async with asyncio.timeout(self.queue_timeout):
                await wait
        except TimeoutError:
            raise Retryable("queue_timeout", errors.overloaded(overloaded), blame=None) from None
        finally:
            waited = time.perf_counter() - t0
            rec.timing.queue_s += waited
            att.queue_s += waited
            if queued is not None:
                queued.end()

    async def _acquire_slot(self, state: DeploymentState, rec: RequestRecord, att: Attempt, span: Any = None) -> None:
        if state.slots.locked():
            await self._wait_queued(state.slots.acquire(), rec, att, span,
                                    f"deployment {state.name} is at its concurrency limit "
                                    f"({state.spec.max_concurrency}) and no slot freed within {self.queue_timeout:g}s")
        else:
            await state.slots.acquire()

    async def _attempt_in_order(self, rec: RequestRecord, plan: Plan, body: dict[str, Any],
                                attempt: Callable[[DeploymentState, bytes, Attempt], Awaitable[T]],
                                stream: bool) -> T:
        """Try the plan's candidates and their deployments in order until one answers.

        Bounded by the plan's attempt count and time budget; deployments whose breaker is open are
        skipped without a call. Only failures before any byte reached the client come here. Every
        breaker probe's outcome is recorded, whatever ends the attempt (`finally`).
        """
        last: GatewayError | None = None
        made = 0
        for model in plan.candidates:
            for state in self.order(model, body, rec):
                if made >= plan.max_attempts or time.perf_counter() - rec.started > plan.budget_s:
                    return self._give_up(rec, plan, last, made)
                breaker = self.breakers[state.name]
                upstream_model = state.spec.upstream_model if model.adapter is None else model.adapter.name
                att = Attempt(state.name, upstream_model, "ok", 0.0, public_model=model.name)
                if not breaker.allow():
                    att.outcome = "circuit_open"
                    rec.routing.attempts.append(att)
                    if rec.trace is not None:
                        rec.trace.skipped(att)
                    continue
                made += 1
                verdict: bool | None = None  # None: the deployment was never really tried
                span = rec.trace.start_attempt(att, made, upstream_model) if rec.trace is not None else None
                lease: Lease | None = None
                try:
                    body["model"] = upstream_model
                    write_priority(body, rec, state.spec.priority_scheduling)
                    payload = orjson.dumps(body)
                    if model.adapter is not None:
                        lease = await self.adapters.acquire(state, model, rec)
                        att.model = model.adapter.name
                    release = await self._acquire(state, rec, att, payload, body, span)
                    try:
                        result = await self._timed(state, rec, att, stream, attempt(state, payload, att), release,
                                                   lease)
                    except GatewayError as e:
                        if lease is None or e.upstream_status != 404:
                            raise
                        # The engine lost the adapter (a restart, another worker's unload): re-read what it
                        # holds, load it again and send the request once more.
                        await self.adapters.lost(state, model)
                        lease = await self.adapters.acquire(state, model, rec)
                        release = await self._acquire(state, rec, att, payload, body, span)
                        result = await self._timed(state, rec, att, stream, attempt(state, payload, att), release,
                                                   lease)
                    lease = None  # released when the call (a stream: its relay) finishes
                    verdict = True
                except Retryable as r:
                    verdict = r.blame
                    att.outcome = r.reason
                    rec.routing.attempts.append(att)
                    last = r.error
                    continue
                except GatewayError as e:
                    # a 4xx means the deployment itself is fine; a catalogue entry naming no adapter is not its fault
                    verdict = None if e.code == "adapter_not_found" else e.status < 500
                    att.outcome = f"error_{e.status}"
                    rec.routing.attempts.append(att)
                    raise
                except asyncio.CancelledError:
                    att.outcome = "abandoned"  # the client left or the gateway is stopping
                    rec.routing.attempts.append(att)
                    raise
                finally:
                    if lease is not None:
                        lease.release()
                    breaker.settle(verdict)
                    if span is not None:
                        _trace_attempt(rec, span, att, verdict, stream)
                rec.routing.attempts.append(att)
                self._served_by(rec, plan, model, state)
                return result
        return self._give_up(rec, plan, last, made)

    async def _timed(self, state: DeploymentState, rec: RequestRecord, att: Attempt, stream: bool,
                     call: Awaitable[T], release: Callable[[], None], lease: Lease | None = None) -> T:
        """Run one call holding the deployment's slot (and its adapter's lease), on its busy clock. A stream
        keeps them until the relay calls its `finish`; everything else gives them back here."""
        t0 = time.perf_counter()
        reading = state.sent(t0)
        done = False

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            if rec.trace is not None:
                rec.trace.attempt_finished()
            now = time.perf_counter()
            att.gpu_s = state.finished(now, reading)
            att.seconds = now - t0
            rec.timing.gpu_s += att.gpu_s
            release()
            if lease is not None:
                lease.release()

        try:
            result = await call
        except BaseException:
            finish()
            rec.timing.upstream_s += att.seconds
            raise
        if stream:
            assert isinstance(result, UpstreamStream)
            result.finish = finish
            rec.timing.upstream_s += time.perf_counter() - t0
        else:
            finish()
            rec.timing.upstream_s += att.seconds
        return result

    @staticmethod
    def _give_up(rec: RequestRecord, plan: Plan, last: GatewayError | None, made: int) -> Any:
        if last is not None:
            raise last
        raise errors.GatewayError(503, f"No deployment of '{plan.name}' is available "
                                  f"(circuit breakers open or attempt budget spent after {made} attempts).",
                                  type="api_error", code="no_deployment_available")

    async def call(self, rec: RequestRecord, plan: Plan, endpoint: Endpoint, body: dict[str, Any],
                   n: int = 1) -> tuple[bytes, UsageTally]:
        """Non-streaming call; returns vLLM's response body unchanged, and its usage."""
        path = contract_of(endpoint).path

        async def attempt(state: DeploymentState, payload: bytes, att: Attempt) -> tuple[bytes, UsageTally]:
            return await self._post_json(state, path, rec, payload, att, n, endpoint)

        return await self._attempt_in_order(rec, plan, body, attempt, stream=False)

    async def _post_json(self, state: DeploymentState, path: str, rec: RequestRecord, payload: bytes,
                         att: Attempt, n: int, endpoint: Endpoint = "chat") -> tuple[bytes, UsageTally]:
        for reuse_retry in (True, False):
            try:
                async with self.pool.session.post(
                    state.spec.url + path, data=payload, timeout=state.timeout,
                    headers=trace_headers(rec, {**state.headers, "Content-Type": JSON,
                                                      "X-Request-Id": rec.identity.request_id}),
                ) as resp:
                    data = await resp.read()
                    status = resp.status
                break
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                raise not_connected(state, e) from None
            except (TimeoutError, aiohttp.ServerTimeoutError):
                # The whole request took longer than the deployment's total timeout: vLLM did (some of) the work,
                # so repeating it elsewhere could double the cost; give an honest 504. vLLM reports no usage
                # for a request it aborts, so what it did is unknown (docs/accounting.md).
                att.usage = "unknown"
                raise errors.upstream_timeout(
                    f"deployment {state.name} did not answer within {state.spec.timeouts.total:g}s") from None
            except asyncio.CancelledError:
                att.usage = "unknown"
                raise
            except aiohttp.ClientConnectionError as e:
                # A pooled keep-alive connection the server had just closed (vLLM's uvicorn drops idle ones
                # after 5 s; a server also closes one whose request body it did not read): the request never
                # reached vLLM, so sending it again on a new connection is safe, once. A body cut mid-way is
                # a ClientPayloadError, below: never sent again.
                if reuse_retry:
                    log.info("deployment %s closed a pooled connection (%s); sending again", state.name,
                             type(e).__name__)
                    continue
                raise Retryable("upstream_disconnected", errors.upstream_unavailable(
                    f"deployment {state.name} failed: {type(e).__name__}")) from None
            except aiohttp.ClientError as e:
                raise Retryable("upstream_disconnected", errors.upstream_unavailable(
                    f"deployment {state.name} failed: {type(e).__name__}")) from None
        if status >= 400:
            raise refused(state, status, data)
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise Retryable("malformed_response", errors.upstream_unavailable(
                f"deployment {state.name} returned a body that is not JSON")) from None
        return data, contract_of(endpoint).tally_body(parsed, n)

    async def open_stream(self, rec: RequestRecord, plan: Plan, endpoint: Endpoint,
                          body: dict[str, Any], n: int = 1) -> UpstreamStream:
        """Start a stream on the first deployment that answers with its first token; it keeps its slot."""
        contract = contract_of(endpoint)
        path, started = contract.path, contract.first_output

        def tally_of(seen: list[bytes]) -> UsageTally:
            return registry.tally_stream_lines(contract, seen) or tally_lines(seen, n)

        async def attempt(state: DeploymentState, payload: bytes, att: Attempt) -> UpstreamStream:
            return await open_upstream_stream(self.pool.session, state, path, rec, payload, att, started, tally_of)

        return await self._attempt_in_order(rec, plan, body, attempt, stream=True)

    async def count_tokens(self, model: Model, body: dict[str, Any]) -> tuple[int, int] | None:
        """Prompt tokens and context window from vLLM's /tokenize, asking the model's deployments in
        order; None when none can answer (the execute stage then finds out which deployment works)."""
        req: dict[str, Any] = {"messages": body["messages"]} if "messages" in body else {
            "prompt": body.get("prompt", "")}
        for state in self.order(model):
            if state.healthy is False or self.breakers[state.name].state is BreakerState.OPEN:
                continue
            req["model"] = state.spec.upstream_model
            try:
                async with self.pool.session.post(state.spec.url + "/tokenize", data=orjson.dumps(req),
                                                  timeout=state.timeout,
                                                  headers={**state.headers, "Content-Type": JSON}) as r:
                    data = orjson.loads(await r.read())
            except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
                continue
            count = data.get("count") if isinstance(data, dict) else None
            window = model.context_window or (data.get("max_model_len") if isinstance(data, dict) else None)
            if isinstance(count, int) and isinstance(window, int):
                return count, window
        return None

    @staticmethod
    def _served_by(rec: RequestRecord, plan: Plan, model: Model, state: DeploymentState) -> None:
        rec.routing.served_model = model.name
        rec.routing.deployment = state.name
        rec.routing.upstream_model = state.spec.upstream_model if model.adapter is None else model.adapter.name
        failed = [a for a in rec.routing.attempts if a.outcome != "ok"]
        if failed:
            rec.routing.fallback_reason = failed[-1].outcome
            if model is not plan.candidates[0]:
                rec.routing.rule = "failure_fallback"


def _trace_attempt(rec: RequestRecord, span: Any, att: Attempt, verdict: bool | None, stream: bool) -> None:
    """The attempt's span: ended now with its outcome, or (answered) kept to end with the record's usage."""
    assert rec.trace is not None
    if verdict is True and att.outcome == "ok":
        rec.trace.answered(span, stream)
    else:
        rec.trace.attempt_failed(span, att, att.outcome)

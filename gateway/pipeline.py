"""The request's path, one stage after another (each stage is the module named after it):

    parse + validate (protocol.py, guards.py) -> authenticate (auth.py) -> plan (routing/policy.py)
      -> admit: limits and budgets (limits.py) -> cache lookup (cache.py)
      -> execute: attempts and fallback (execute.py) -> relay the stream (relay.py, streaming.py)
      -> finalize: price, record, log, metrics, ledger, settle (finalize.py)

`Gateway` holds the stages, built once per worker from the compiled config; `handle` runs one request
through them and answers through raw ASGI (no framework on the hot path). App assembly is in app.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway import errors, priority
from gateway.apis import registry, retrieve
from gateway.apis.contract import EndpointContract, contract_of
from gateway.apis.events import EventAccountant
from gateway.apis.registry import Apis
from gateway.apis.stored import Location
from gateway.asgi import (
    DUPLICATE,
    SSE,
    ClientGone,
    cancel_on_disconnect,
    encode_headers,
    respond,
    wanted_headers,
)
from gateway.auth import Authenticator
from gateway.cache import Lookup, build_cache
from gateway.config import GatewayConfig, Model, Pricing
from gateway.deadline import Watchdog
from gateway.errors import GatewayError
from gateway.execute import Executor
from gateway.fair_queue import FairQueue, build_queues
from gateway.finalize import Finalizer, RequestLog, early_headers, final_headers, stream_trailer
from gateway.guards import check_depth, credential, duplicate_header
from gateway.ledger import Ledger, build_ledger_backend
from gateway.ledger_gate import LedgerGate
from gateway.limits import build_limiter
from gateway.metrics import GatewayMetrics
from gateway.prompt_tokens import load_counters
from gateway.protocol import MAX_MODEL_NAME, Endpoint
from gateway.record import RequestRecord
from gateway.relay import Relay, UpstreamStream
from gateway.routing.adapters import AdapterPlacement
from gateway.routing.balance import Balancing
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.routing.live import LiveStats
from gateway.routing.policy import Plan, Planner
from gateway.routing.task_auto import Decision, TaskAutoRouter, describe
from gateway.slo import SloAdmission, SloPredictor
from gateway.spool import Spool, spool_path
from gateway.store import build_store
from gateway.streaming import RecordingAccountant, StreamAccountant, replay
from gateway.tracing import build_tracing
from gateway.upstream import UpstreamPool

log = logging.getLogger("gateway")

# What an unknown-model request is charged as: one request against rpm/concurrency, no tokens, no cost.
NO_MODEL = Model("_unknown", (), Pricing(), "none")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


_BLOCKED_S = 0.002  # a send that took longer waited for the client's socket to drain
_SLOW_READER_S = 0.05  # a client that held the stream back this long in all reads slowly


class Gateway:
    """Everything one worker needs to serve, built once at start-up from the compiled config."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.max_body = config.server.max_body_bytes
        self.body_timeout = config.server.body_timeout
        self.body_watchdog = Watchdog(self.body_timeout)
        self.max_depth = config.server.max_json_depth
        self.auth = Authenticator(config)
        deployments = {d.name for m in config.models.values() for d in m.deployments}
        self.metrics = GatewayMetrics(set(config.models), deployments)
        # Response cache, limits and budgets, usage ledger: one store (Redis, or in-process without a URL).
        f = config.features
        self._redis_logged: dict[str, float] = {}
        self.store = build_store(config, self._redis_error)
        self.cache = build_cache(config, self.store, self.metrics.cache_corrupt.inc)
        # Each model's prompt counter (its tokenizer, loaded once): reservations and usage-less endings.
        counters = load_counters({m.name: m.tokenizer for m in config.models.values()})
        self.apis = Apis(config, self.store, counters)  # stored responses: where, how large; usage-less counts
        # What Redis does not take (ledger records, limit settles) waits in a local file (gateway/spool.py).
        path = spool_path(f.ledger.spool_path) if self.store.name == "redis" else None
        self.spool = Spool(path, f.ledger.spool_max_bytes, self._spool_error, self._spool_counts) if path else None
        self.limiter = build_limiter(config, self.store, self._spend_seen, self.metrics,
                                     window=lambda m: self.planner.window(m), counters=counters,  # planner: below
                                     spool=self.spool)
        self.ledger = Ledger(build_ledger_backend(config, self.store), f.redis.ledger_buffer,
                             f.redis.ledger_flush_interval_s, self.metrics.ledger_buffered.set,
                             self.metrics.ledger_dropped.inc, f.ledger.buffer_bytes, spool=self.spool,
                             on_replayed=self.metrics.ledger_replayed.inc)
        # A response ends only once its ledger record is in Redis, or in the spool while Redis fails (a killed
        # replica loses no finished request).
        self.ledger_gate = LedgerGate(self.ledger, f.redis.timeout_s * 2, max(f.redis.down_for_s, 0.5),
                                      self.limiter.sync_spool) \
            if self.store.name == "redis" and f.redis.ledger_before_response else None
        # Upstreams, their breakers and live figures, and the routing rules over them.
        self.pool = UpstreamPool(config, on_checked=self._health_checked)
        self.breakers = {name: CircuitBreaker(name, config.circuit_breaker, self._breaker_changed)
                         for name in self.pool.states}
        self.live = LiveStats(config)
        # Fair queues where deployments declare one, priority classes, and admission by TTFT objective.
        deps = {d.name: d for m in config.models.values() for d in m.deployments}
        self.queues = build_queues({n: (d.max_concurrency, d.fair_queue) for n, d in deps.items()
                                    if d.fair_queue is not None}, config.scheduling.weight, self.live.by_deployment.get)
        for q in self.queues.values():
            q.on_change = self._queue_changed
        self.slo = SloAdmission(SloPredictor(self.queues, {n: d.max_concurrency for n, d in deps.items()}),
                                in_flight=lambda name: self.pool.states[name].in_flight,
                                usable=lambda name: self.breakers[name].state is not BreakerState.OPEN)
        # Catalogue LoRA adapters: which engine holds which, loaded on demand (routing/adapters.py).
        self.adapters = AdapterPlacement(config, self.pool, self.metrics)
        self.executor = Executor(self.pool, self.breakers, Balancing(config, self.live, self.breakers), self.queues,
                                 self.adapters)
        self.live.prefix_listeners.append(self._prefix_index_seen)  # after the balancer's own listener
        self.planner = Planner(config, self.live, self.breakers, budget_fraction=self.limiter.budget_used_fraction,
                               in_flight=lambda name: self.pool.states[name].in_flight)
        self.task_auto = TaskAutoRouter(config, self.pool, self.breakers, on_fitted=self._classifier_fitted)
        # Finalize: the record goes to the log and the ledger, then limits settle and routing learns.
        self.finalizer = Finalizer(config, self.metrics, RequestLog(config.server.request_log))
        self.finalizer.record_sinks.append(self.ledger.append)
        self.finalizer.observers += [self.limiter.settle, self._observe_latency, self._observe_scheduling]
        self.active: set[asyncio.Task[Any]] = set()  # requests being served (shutdown waits for their accounts)
        self.tracing = build_tracing(config)  # None when off: each stage then checks `rec.trace is not None`
        self._set_static_gauges()

    def _set_static_gauges(self) -> None:
        for name, m in self.config.models.items():
            self.metrics.model_info.labels(name, m.tier).set(1)
        for name in self.breakers:
            self.metrics.breaker_state.labels(name).set(0)
        for name in self.queues:
            self.metrics.fair_queue_waiting.labels(name).set(0)
        for reason in ("full", "io"):  # from 0: the first refusal is an increase an alert sees
            self.metrics.spool_errors.labels(reason)
        for route in self.task_auto.classifiers:
            self.metrics.classifier_ready.labels(route).set(0)
        for tenant, lim in self.config.features.tenant_limits.items():
            for period, budget in (("day", lim.budget_day), ("month", lim.budget_month)):
                if budget:
                    self.metrics.tenant_budget.labels(tenant, period).set(budget)
        # Counters alerts take increase() of exist from the start at 0: the first fail-open admission or
        # dropped settle is then an increase (a series born at 3 would read as no increase at all).
        for tenant in {t.name for t in self.config.keys_by_sha256.values()} | set(self.config.features.tenant_limits):
            self.metrics.limits_fail_open.labels(tenant)
        for reason in ("overflow", "command_error"):
            self.metrics.limit_settles_dropped.labels(reason)
        self.metrics.ledger_capacity.set(self.config.features.redis.ledger_buffer)

    def _redis_error(self, operation: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(operation).inc()
        now = time.monotonic()
        if now - self._redis_logged.get(operation, 0.0) >= 10.0:  # one line per operation per 10 s
            self._redis_logged[operation] = now
            log.warning("redis %s failed: %s: %s", operation, type(exc).__name__, exc)

    def _spool_error(self, reason: str) -> None:
        self.metrics.spool_errors.labels(reason).inc()

    def _spool_counts(self, records: int, settles: int) -> None:
        self.metrics.ledger_spooled.set(records)
        self.metrics.limit_settles_spooled.set(settles)

    def _classifier_fitted(self, route: str, example_tokens: int) -> None:
        self.metrics.classifier_ready.labels(route).set(1)
        self.metrics.routing_tokens.labels(route, "examples").inc(example_tokens)

    def _spend_seen(self, tenant: str, period: str, usd: float) -> None:
        self.metrics.spend.seen(tenant, period, usd)

    def _breaker_changed(self, deployment: str, state: BreakerState) -> None:
        log.warning("circuit breaker of %s is now %s", deployment, state.name.lower())
        self.metrics.breaker_state.labels(deployment).set(int(state))

    def _observe_latency(self, rec: RequestRecord) -> None:
        """Feed the deadline rule's live figures from successful requests."""
        if rec.end.status != 200 or rec.routing.deployment is None:
            return
        if rec.identity.stream:
            self.live.get(rec.routing.deployment).observe(rec.timing.ttft_s, rec.timing.tpot_s)
        elif rec.usage.completion_tokens > 0 and contract_of(rec.identity.endpoint).output_fields:
            self.live.get(rec.routing.deployment).observe(None, rec.timing.upstream_s / rec.usage.completion_tokens)

    def _observe_scheduling(self, rec: RequestRecord) -> None:
        """The fair queue's charge becomes vLLM's usage; the SLO predictor learns; the SLO outcome is judged."""
        for a in rec.routing.attempts:
            q = self.queues.get(a.deployment)
            if q is not None and a.fair_charge and a.outcome == "ok" and rec.usage.usage_reported:
                q.correct(rec.identity.tenant, rec.usage.prompt_tokens + rec.usage.completion_tokens - a.fair_charge)
        self.slo.predictor.observe(rec)

    def _queue_changed(self, q: FairQueue) -> None:
        self.metrics.fair_queue_waiting.labels(q.name).set(q.queued())

    def _prefix_index_seen(self, deployment: str, *_: object) -> None:
        idx = self.executor.balancing.index_of(deployment)
        if idx is not None:
            self.metrics.prefix_index.labels(deployment, "held").set(len(idx.blocks))
            self.metrics.prefix_index.labels(deployment, "capacity").set(idx.capacity)

    def _health_checked(self, pool: UpstreamPool) -> None:
        for name, state in pool.states.items():
            self.metrics.upstream_healthy.labels(name).set(1 if state.healthy else 0)
        self.adapters.health_checked()  # an engine back from a restart: re-read the adapters it holds

    async def read_json(self, headers: dict[bytes, bytes], receive: Receive) -> Any:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise errors.payload_too_large(self.max_body)
        chunks: list[bytes] = []
        size = 0
        # One deadline for the whole body, first message included: a client that sends its headers
        # (say Content-Length: 100) and then nothing, or trickles the body (slowloris), is cut off.
        task = asyncio.current_task()
        assert task is not None
        self.body_watchdog.watch(task)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise errors.payload_too_large(self.max_body)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if not self.body_watchdog.done(task):
                raise  # cancelled from outside (shutdown), not by the body deadline
            task.uncancel()
            raise GatewayError(408, f"The request body did not arrive within {self.body_timeout:g}s.",
                               code="request_timeout") from None
        finally:
            self.body_watchdog.done(task)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not raw:
            raise errors.bad_request("Request body is empty; expected a JSON object.")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise errors.bad_request(f"Request body is not valid JSON: {e.msg}", code="invalid_json") from None
        check_depth(raw, body, self.max_depth)  # before anything (orjson.dumps included) walks the body
        return body

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        """One request through the stages, in order; every way it can end is recorded once."""
        headers = wanted_headers(scope["headers"])
        rid = headers.get(b"x-request-id")
        rec = RequestRecord(rid.decode() if rid and _REQUEST_ID.fullmatch(rid) else os.urandom(16).hex(), endpoint)
        if self.tracing is not None:
            self.tracing.begin(rec, headers, scope["method"], scope["path"])
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        watcher: asyncio.Task[None] | None = None
        try:
            self._authenticate(rec, headers)  # parse (the headers) + authenticate
            contract = contract_of(endpoint)
            if contract.stored_lookup:  # GET / cancel a stored response: no body, its engine only
                data = await self._stored_response(rec, contract, scope)
                rec.end.status = 200
                self.finalizer.finalize(rec)
                await respond(send, 200, data, final_headers(rec))
                return
            body = await self.read_json(headers, receive)  # parse (the body)
            # From here on the client leaving cancels this task, wherever it is: limits, queue, vLLM, relay.
            watcher = asyncio.create_task(cancel_on_disconnect(receive, task))
            plan, pinned = await self._plan_and_admit(rec, contract, body, headers)  # validate, plan, admit
            stream = contract.streams(body)
            n = contract.choices(body)
            lk = await self._cache_lookup(rec, plan, endpoint, body, headers, stream)
            try:
                if stream:  # execute + relay + finalize, the answer going out as it comes
                    await self._stream(rec, plan, contract, body, send, lk, n, watcher.cancel, pinned)
                    self.finalizer.finalize(rec)  # a stream that failed mid-way (a complete one already is)
                    return
                data = await self._answer(rec, plan, contract, body, lk, n, pinned)  # execute (or the cache)
                watcher.cancel()  # the answer is here: a client leaving now changes nothing
                rec.end.status = 200
                self.finalizer.finalize(rec)
                self.cache.store(lk, rec, "json", data)
            finally:
                self.cache.release(lk)
            if self.ledger_gate is not None:
                await self.ledger_gate.wait()
            await respond(send, 200, data, final_headers(rec))
        except GatewayError as e:
            if watcher is not None:
                watcher.cancel()  # answering now: the end of the response must not look like the client leaving
            await self._error(rec, e, send)
        except ClientGone:
            rec.end.outcome, rec.end.status = "client_left_before_response", 499
            self.finalizer.finalize(rec)
        except asyncio.CancelledError:
            if not self._client_left(rec, task, watcher):
                raise  # cancelled from outside: the server is stopping
        except Exception:
            log.exception("internal error in request %s", rec.identity.request_id)
            await self._error(rec, GatewayError(500, f"Internal gateway error (request id {rec.identity.request_id}).",
                                                type="api_error", code="internal_error"), send)
        finally:
            self.active.discard(task)
            if watcher is not None:
                watcher.cancel()
            if rec.trace is not None:
                rec.trace.end(rec)

    async def _cache_lookup(self, rec: RequestRecord, plan: Plan, endpoint: Endpoint, body: dict[str, Any],
                            headers: dict[bytes, bytes], stream: bool) -> Lookup:
        t0 = rec.trace.lookup_starts() if rec.trace is not None else 0
        lk = await self.cache.lookup(rec, plan.candidates[0], endpoint, body, headers.get(b"cache-control"), stream)
        if rec.trace is not None:
            rec.trace.looked_up(rec, t0)
        return lk

    def _authenticate(self, rec: RequestRecord, headers: dict[bytes, bytes]) -> None:
        if rec.trace is not None:
            rec.trace.stage("gateway.admit")  # authentication, plan and limits: until the cache lookup
        if DUPLICATE in headers:
            raise duplicate_header(headers[DUPLICATE])
        tenant, key_hash = self.auth.authenticate(credential(headers.get(b"authorization"), headers.get(b"x-api-key")))
        rec.identity.tenant, rec.identity.api_key_hash = tenant.name, key_hash

    async def _plan_and_admit(self, rec: RequestRecord, contract: EndpointContract, body: dict[str, Any],
                              headers: dict[bytes, bytes]) -> tuple[Plan, Location | None]:
        """Validate, plan (models and deployments in fallback order), then admit (limits and budgets)."""
        req = contract.validate(body)
        rec.identity.requested_model = req.model
        cls = priority.assign(rec, self.config.scheduling, headers.get(priority.HEADER), body)
        try:
            plan = await self._plan(rec, contract, req.model, body, headers)
        except GatewayError as e:
            if e.code == "model_not_found":  # a probe for names still counts: one request, no tokens
                await self.limiter.admit(rec, NO_MODEL, {})
            raise
        pinned = await self.apis.pin(rec, contract, plan, body)  # continues a stored response: its engine
        self.finalizer.begin(rec)
        self.apis.prepare(contract, body)  # gateway/apis/: the response id (the output bound: admit, below)
        if contract.output_fields:  # generation: vLLM's prefix cache is shared only within a prompt scope
            body["cache_salt"] = self.config.features.cache_salt(rec.identity.tenant)
        # The reservation covers every candidate (a fallback may serve it) and a stored conversation it continues.
        stored = self.apis.stored_context(pinned, self.planner.window(plan.candidates[0]))
        if rec.trace is not None:
            rec.trace.request(rec, body)
        await self.limiter.admit(rec, plan.candidates, body, stored)  # 429 (or 503 failing closed) refuses here
        if pinned is None:  # a continued stored response has one engine: nothing to choose or predict
            self.slo.check(rec, cls, plan, body)  # 429 with Retry-After, or a fallback, if the TTFT objective fails
        return plan, pinned

    async def _stored_response(self, rec: RequestRecord, contract: EndpointContract, scope: Scope) -> bytes:
        """A stored response's GET / cancel: counted against the limits (one request, no tokens) before
        anything is looked up, then sent to the engine that holds it (gateway/apis/retrieve.py)."""
        rid = retrieve.response_id(scope, contract.method)
        await self.limiter.admit(rec, NO_MODEL, {})
        loc = await self.apis.locator.locate(rid, rec.identity.tenant)
        rec.identity.requested_model = rec.routing.served_model = loc.model
        self.finalizer.begin(rec)
        state = retrieve.engine(self.pool, loc, rid)
        return await retrieve.forward(self.pool, rec, state, rid, contract.path, contract.method)

    async def _answer(self, rec: RequestRecord, plan: Plan, contract: EndpointContract, body: dict[str, Any],
                      lk: Lookup, n: int, pinned: Location | None) -> bytes:
        """A non-streaming answer: the cache's, or vLLM's (its usage copied into the record)."""
        if lk.entry is not None:
            return lk.entry.body
        try:
            data, tally = await self.executor.call(rec, plan, contract.name, body, n)
        except GatewayError as e:
            raise self.apis.pinned_failure(body, pinned, e) from None
        tally.write(rec)
        await self.apis.usage_less_answer(rec, contract, body, self.pool, pinned)  # never free, never guessed
        await self.apis.served(rec, contract, body, finished=True)
        return data

    def _client_left(self, rec: RequestRecord, task: asyncio.Task[Any], watcher: asyncio.Task[None] | None) -> bool:
        """This task was cancelled: by our watcher (the client left: recorded, True) or from outside (False)."""
        if watcher is None or not watcher.done() or watcher.cancelled():
            rec.end.outcome, rec.end.status = "gateway_shutdown", rec.end.status or 503
            self.finalizer.finalize(rec)
            return False
        task.uncancel()
        if not rec.end.outcome.startswith("client_left"):
            rec.end.outcome = "client_left_before_response"
        rec.end.status = 499
        self.finalizer.finalize(rec)
        return True

    async def _error(self, rec: RequestRecord, e: GatewayError, send: Send) -> None:
        rec.end.status, rec.end.error_code = e.status, e.code
        rec.end.outcome = "timeout" if e.code == "upstream_timeout" else "error"
        self.finalizer.finalize(rec)
        body = contract_of(rec.identity.endpoint).error_body(e)
        await respond(send, e.status, body, {**final_headers(rec), **e.headers})

    async def _plan(self, rec: RequestRecord, contract: EndpointContract, name: str, body: dict[str, Any],
                    headers: dict[bytes, bytes]) -> Plan:
        task_raw = headers.get(b"x-gateway-task")
        metadata = body.get("metadata")
        task = task_raw.decode("latin-1").strip().lower() if task_raw else (
            str(metadata["task"]).lower() if isinstance(metadata, dict) and metadata.get("task") else None)
        if task is not None and len(task) > MAX_MODEL_NAME:  # it goes to the log and the ledger: keep it short
            raise errors.bad_request(f"The task name is longer than {MAX_MODEL_NAME} characters.",
                                     param="x-gateway-task" if task_raw else "metadata.task")
        deadline_ms = None
        if (raw := headers.get(b"x-gateway-deadline-ms")) is not None:
            try:
                deadline_ms = float(raw)
                if not 0 < deadline_ms < 1e9:
                    raise ValueError
            except ValueError:
                raise errors.bad_request("Header x-gateway-deadline-ms must be a positive number of milliseconds.",
                                         param="x-gateway-deadline-ms") from None
        decision, task_rule = None, "task"
        route = self.config.routes.get(name)
        if route is not None and route.auto is not None and contract.output_fields:
            decision = Decision("declared") if task is not None else await self.task_auto.decide(
                name, contract.conversation(body))  # never fails: the default route when it cannot decide
            self._decided(rec, decision)
            if decision.task is not None:
                task, task_rule = decision.task, "task_auto"
        plan = await self.planner.plan(name, body, rec.identity.tenant, task, deadline_ms, self.executor.count_tokens,
                                       task_rule)
        if decision is not None:
            plan.decisions.insert(0, describe(decision))
        rec.routing.primary_model = plan.requested.name
        rec.routing.route = plan.route.name if plan.route is not None else None
        rec.routing.task = task
        rec.routing.rule, rec.routing.fallback_reason = plan.rule, plan.reason
        rec.routing.route_decisions = plan.decisions
        rec.routing.deadline_ms = None if plan.deadline_s is None else plan.deadline_s * 1e3
        rec.routing.predicted_ms = None if plan.predicted_s is None else plan.predicted_s * 1e3
        return plan

    async def _open_stream(self, rec: RequestRecord, plan: Plan, contract: EndpointContract, body: dict[str, Any],
                           n: int, pinned: Location | None) -> UpstreamStream:
        try:
            stream = await self.executor.open_stream(rec, plan, contract.name, body, n)
        except GatewayError as e:
            raise self.apis.pinned_failure(body, pinned, e) from None
        await self.apis.served(rec, contract, body, finished=False)
        return stream

    @staticmethod
    def _decided(rec: RequestRecord, d: Decision) -> None:
        """task_auto's decision and what it took go into the record (and so to headers, log, metrics, ledger)."""
        rec.routing.task_decision, rec.routing.task_confidence, rec.routing.task_best = d.outcome, d.confidence, d.best
        rec.timing.routing_s += d.seconds
        rec.usage.routing_tokens += d.tokens
        rec.money.routing_cost_pico_usd += d.cost_pico_usd

    async def _stream(self, rec: RequestRecord, plan: Plan, contract: EndpointContract, body: dict[str, Any],
                      send: Send, lk: Lookup, n: int, stop_watching: Callable[[], object],
                      pinned: Location | None = None) -> None:
        rec.identity.stream = True
        acct = _accountant(rec, contract, body, lk, n)
        stream = None if lk.entry is not None else await self._open_stream(rec, plan, contract, body, n, pinned)
        rec.end.status = 200
        if rec.trace is not None:
            rec.trace.start_stream()

        ended = False

        def on_done() -> bytes:
            nonlocal ended
            ended = True
            line = self.finalizer.finalize(rec)
            # Only called for a stream that completed; one that outgrew max_entry_bytes was not kept.
            if isinstance(acct, RecordingAccountant):
                if (recorded := acct.recorded()) is not None:
                    self.cache.store(lk, rec, "sse", recorded)
            elif (payloads := getattr(acct, "payloads", None)) is not None:  # Responses / Messages events
                self.cache.store(lk, rec, "sse", b"\n".join(payloads))
            return stream_trailer(line)

        async def usage_less() -> None:
            await self.apis.unfinished_stream(rec, contract, body, acct, self.pool, pinned)

        relay = None if stream is None else Relay(stream, rec, acct, on_done, usage_less)
        chunks = relay.chunks() if relay is not None else replay(lk.entry.payloads(), acct, on_done)  # type: ignore[union-attr]
        sending, t0 = False, 0.0
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": encode_headers({**early_headers(rec), "cache-control": "no-cache"}, SSE)})
            async for chunk in chunks:
                if ended and self.ledger_gate is not None:  # the trailer and [DONE] wait for the ledger
                    await self.ledger_gate.wait()
                sending, t0 = True, time.perf_counter()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                waited = time.perf_counter() - t0
                sending = False
                if waited > _BLOCKED_S:  # the client's socket was full: it is not keeping up
                    rec.timing.client_wait_s += waited
            stop_watching()  # the response is complete: the client closing now is not leaving early
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if sending:  # left while a write to it was blocked
                rec.timing.client_wait_s += time.perf_counter() - t0
            slow = sending or rec.timing.client_wait_s >= _SLOW_READER_S
            rec.end.outcome = "client_left_slow_reader" if slow else "client_left_midstream"
            raise
        finally:
            await chunks.aclose()
            if relay is not None:
                await relay.abandon()  # no-op when the upstream side already ended
                if not relay.completed:
                    await self.apis.unfinished_stream(rec, contract, body, acct, self.pool, pinned)
                await self.apis.served(rec, contract, body, finished=True)

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": m.owned_by,
             "root": m.deployments[0].upstream_model}
            for name, m in self.config.models.items()] + [
            {"id": name, "object": "model", "created": 0, "owned_by": "gateway-route",
             "root": r.candidates[0].name, "candidates": [c.name for c in r.candidates]}
            for name, r in self.config.routes.items()]}


def _accountant(rec: RequestRecord, contract: EndpointContract, body: dict[str, Any], lk: Lookup,
                n: int) -> StreamAccountant | EventAccountant:
    """Who reads the stream: Responses / Messages have their own named-event accountant (gateway/apis/);
    chat and completions always get vLLM's usage in every chunk, and the client only what it asked for."""
    acct = registry.accountant(contract, rec, lk.may_store, lk.max_bytes)
    if acct is not None:
        return acct
    asked = body.get("stream_options") or {}
    if not isinstance(asked, dict):
        raise errors.bad_request("'stream_options' must be an object.", param="stream_options")
    # A miss that may be stored keeps the upstream payloads (RecordingAccountant); a hit replays them.
    usage, continuous = asked.get("include_usage") is True, asked.get("continuous_usage_stats") is True
    body["stream_options"] = {**asked, "include_usage": True, "continuous_usage_stats": True}
    if lk.may_store:
        return RecordingAccountant(rec, usage, continuous, n, lk.max_bytes)
    return StreamAccountant(rec, usage, continuous, n)

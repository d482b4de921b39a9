"""Prometheus metrics, written from the request record in one place (see docs/metrics.md for names and labels).

Label values are bounded: model is a configured public model name or "_unknown"; deployment a
configured deployment name or "_none"; tenant a configured tenant, "anonymous" (auth off) or
"unauthenticated"; status the HTTP status code. With several workers, prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `gateway serve`) keeps /metrics correct.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.money import usd
from gateway.record import RequestRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics.CONTENT_TYPE_LATEST  # the format that carries exemplars

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
ROUTING_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

UNKNOWN_MODEL = "_unknown"
NO_DEPLOYMENT = "_none"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    def __init__(self, models: set[str], deployments: set[str]) -> None:
        self._models = models
        self._deployments = deployments
        self.registry = CollectorRegistry(auto_describe=True)
        # Resource figures for leak hunting (soak test): memory, open fds, CPU, live asyncio tasks.
        ProcessCollector(registry=self.registry)
        self.registry.register(_AsyncioTasks())
        r = self.registry
        md = ["model", "deployment"]
        mdt = ["model", "deployment", "tenant"]
        self.requests = Counter("gateway_requests", "Requests finished, by status", [*mdt, "status"], registry=r)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens as vLLM reported them", mdt, registry=r)
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens as vLLM reported them", mdt, registry=r)
        self.cached_tokens = Counter(
            "gateway_cached_prompt_tokens", "Prompt tokens vLLM served from its prefix cache", mdt, registry=r)
        self.cost = Counter("gateway_cost_usd", "Cost of served requests in USD", mdt, registry=r)
        # Work vLLM did that no request is billed for: fan-out prefills (n > 1) and abandoned attempts.
        # served + fan-out + wasted tokens reconcile with vLLM's own prompt/generation token counters.
        self.fanout_prompt_tokens = Counter(
            "gateway_fanout_prompt_tokens", "Prompt prefills of the extra choices of n > 1 requests (vLLM counts "
            "the prompt once per choice, usage once)", mdt, registry=r)
        waste = ["model", "deployment", "reason"]
        self.wasted_prompt_tokens = Counter("gateway_wasted_prompt_tokens", "Prompt tokens vLLM processed for "
                                            "attempts the gateway abandoned", waste, registry=r)
        self.wasted_completion_tokens = Counter("gateway_wasted_completion_tokens", "Tokens vLLM generated for "
                                                "attempts the gateway abandoned", waste, registry=r)
        self.wasted_cost = Counter("gateway_wasted_cost_usd", "What abandoned attempts cost", waste, registry=r)
        self.outcomes = Counter("gateway_request_outcomes", "Requests by how they ended", ["model", "outcome"],
                                registry=r)
        self.e2e = Histogram("gateway_request_duration_seconds", "End-to-end time in the gateway", md,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Arrival to first token sent", md,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("gateway_time_per_output_token_seconds", "Mean time per output token after the first",
                              md, buckets=TPOT_BUCKETS, registry=r)
        self.overhead = Histogram("gateway_overhead_seconds", "Time not spent waiting on vLLM or a queue", md,
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.queue = Histogram("gateway_queue_seconds", "Time waiting for a deployment slot", md,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being served", ["model"],
                               multiprocess_mode="livesum", registry=r)
        self.upstream_healthy = Gauge("gateway_upstream_healthy", "1 if the deployment's /health answers",
                                      ["deployment"], multiprocess_mode="max", registry=r)
        self.fallbacks = Counter("gateway_fallbacks", "Requests served by another model than their first "
                                 "candidate", ["from_model", "to_model", "reason"], registry=r)
        self.counterfactual_cost = Counter(
            "gateway_counterfactual_cost_usd", "What the first candidate model would have charged for the same "
            "tokens", mdt, registry=r)
        self.prefix_saved = Counter(
            "gateway_prefix_saved_usd", "What vLLM's prefix cache saved: cached prompt tokens at the uncached "
            "price minus their billed price", mdt, registry=r)
        self.balance_decisions = Counter(
            "gateway_balance_decisions", "How the deployment was chosen within a model (routing/balance.py)",
            ["model", "deployment", "decision"], registry=r)
        self.prefix_index = Gauge(
            "gateway_prefix_index_blocks", "Prefix blocks this worker's index remembers per deployment (kind: held) "
            "and may hold (capacity), refreshed at each scrape of vLLM's metrics", ["deployment", "kind"],
            multiprocess_mode="max", registry=r)
        # LoRA adapters loaded on demand (gateway/routing/adapters.py)
        ae = ["adapter", "engine"]
        self.adapter_loads = Counter("gateway_adapter_loads", "Adapter loads onto an engine, by why: cold (held "
                                     "nowhere), replica (hot: one more engine), reload (the engine lost it)",
                                     [*ae, "reason"], registry=r)
        self.adapter_load_failures = Counter("gateway_adapter_load_failures", "Adapter loads that failed: timeout, "
                                             "error, not_found (no adapter at its path), slots_full",
                                             [*ae, "reason"], registry=r)
        self.adapter_evictions = Counter("gateway_adapter_evictions", "Adapters unloaded: lru, random, idle; lost: "
                                         "gone from the engine (restart)", [*ae, "reason"], registry=r)
        self.adapter_load_seconds = Histogram("gateway_adapter_load_seconds", "Time an adapter load took",
                                              ["engine"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapters_held = Gauge("gateway_adapters_held", "Catalogue adapters an engine holds, as this worker "
                                   "sees it", ["engine"], multiprocess_mode="max", registry=r)
        self.adapter_load_cost = Counter("gateway_adapter_load_cost_usd", "Engine time of adapter loads at the "
                                         "configured rate, by who pays (request: billed; operator: not)",
                                         [*ae, "billed_to"], registry=r)
        self.breaker_state = Gauge("gateway_circuit_breaker_state", "0 closed, 1 half-open, 2 open",
                                   ["deployment"], multiprocess_mode="max", registry=r)
        self.model_info = Gauge("gateway_model_info", "1 per configured model, with its tier", ["model", "tier"],
                                multiprocess_mode="max", registry=r)
        # response cache, rate limits and budgets, usage ledger, Redis (docs/redis.md)
        mt = ["model", "tenant"]
        self.cache_requests = Counter("gateway_cache_requests", "Cache stage results (hit, miss, bypass)",
                                      [*mt, "result"], registry=r)
        self.cache_saved = Counter("gateway_cache_saved_usd", "What cache hits would have cost", mt, registry=r)
        self.cache_tokens = Counter("gateway_cache_tokens", "Tokens of answers served from the gateway cache",
                                    [*mt, "kind"], registry=r)
        self.ratelimit_refusals = Counter("gateway_ratelimit_refusals", "Requests refused by a limit or budget",
                                          ["tenant", "limit"], registry=r)
        self.redis_errors = Counter("gateway_redis_errors", "Redis commands that failed", ["operation"], registry=r)
        self.limits_fail_open = Counter("gateway_limits_fail_open", "Requests let through unchecked: limit store down",
                                        ["tenant"], registry=r)
        self.limit_settles_pending = Gauge("gateway_limit_settles_pending", "Limit settles waiting for Redis",
                                           multiprocess_mode="livesum", registry=r)
        self.limit_settles_dropped = Counter("gateway_limit_settles_dropped", "Limit settles given up (see docs)",
                                             ["reason"], registry=r)
        self.ledger_dropped = Counter("gateway_ledger_dropped", "Ledger records lost to a full buffer", registry=r)
        # The spool (gateway/spool.py): what waits on local disk for Redis, and what it could not take.
        self.ledger_spooled = Gauge("gateway_ledger_spooled", "Ledger records in the spool file, waiting for Redis",
                                    multiprocess_mode="max", registry=r)
        self.limit_settles_spooled = Gauge("gateway_limit_settles_spooled", "Limit settles in the spool file, "
                                           "waiting for Redis", multiprocess_mode="max", registry=r)
        self.ledger_replayed = Counter("gateway_ledger_replayed", "Ledger records written to Redis from the spool",
                                       registry=r)
        self.spool_errors = Counter("gateway_spool_errors", "Spool writes refused (full: ledger.spool_max_bytes; "
                                    "io: file unwritable): what they held stays in memory only", ["reason"],
                                    registry=r)
        self.cache_corrupt = Counter("gateway_cache_corrupt_entries",
                                     "Cache entries that could not be decoded (answered as a miss)", registry=r)
        self.ledger_buffered = Gauge("gateway_ledger_buffered", "Ledger records waiting to be written",
                                     multiprocess_mode="livesum", registry=r)
        # what gateway_ledger_buffered may reach before records are dropped (alerts use the ratio)
        self.ledger_capacity = Gauge("gateway_ledger_buffer_capacity", "Ledger records the buffer holds before "
                                     "it drops (redis.ledger_buffer)", multiprocess_mode="livesum", registry=r)
        self.tenant_spend = Gauge("gateway_tenant_spend_usd", "Spend in the current budget period, as last seen",
                                  ["tenant", "period"], multiprocess_mode="max", registry=r)
        self.tenant_budget = Gauge("gateway_tenant_budget_usd", "Configured budget", ["tenant", "period"],
                                   multiprocess_mode="max", registry=r)
        # scheduling: fair queues, priority classes, TTFT objectives (docs/fairness.md)
        self.tenant_queue = Histogram("gateway_tenant_queue_seconds", "Time waiting for a deployment slot, per "
                                      "tenant (fair queue or concurrency limit)", ["deployment", "tenant"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.fair_queue_waiting = Gauge("gateway_fair_queue_waiting", "Requests waiting in a deployment's fair queue",
                                        ["deployment"], multiprocess_mode="livesum", registry=r)
        self.slo_requests = Counter("gateway_slo_requests", "Requests of a class with a TTFT objective, by result "
                                    "(met, missed, refused, fallback)", ["priority_class", "result"], registry=r)
        self.slo_error = Histogram("gateway_slo_prediction_error_seconds", "Absolute error of the predicted time "
                                   "to first token at admission", ["priority_class"], buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.spend = TenantSpend(self.tenant_spend)
        # automatic task routing (routing/task_auto.py): decisions, confidence, what deciding took and saved
        self.route_decisions = Counter(
            "gateway_route_decisions", "Routing decisions of a rule (task_auto: how each request's task was decided)",
            ["route", "rule", "task", "outcome"], registry=r)
        self.task_confidence = Histogram(
            "gateway_task_confidence", "task_auto: the classifier's probability of the most likely task",
            ["route", "task"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.routing_seconds = Histogram("gateway_routing_seconds", "Time spent deciding the route (task_auto's "
                                         "embedding call)", ["route"], buckets=ROUTING_BUCKETS, registry=r)
        self.routing_tokens = Counter(
            "gateway_routing_tokens", "Embedding tokens spent deciding tasks (purpose: request, or examples when "
            "the classifier is fitted)", ["route", "purpose"], registry=r)
        self.task_auto_cost = Counter(
            "gateway_task_auto_cost_usd", "Requests of task_auto routes: billed (routing included), what the default "
            "model would have charged (counterfactual), and the routing part", ["route", "kind"], registry=r)
        self.classifier_ready = Gauge("gateway_task_classifier_ready", "1 once the route's task classifier is fitted",
                                      ["route"], multiprocess_mode="min", registry=r)
        # Labelled children looked up once per label set (labels() costs a lock and a dict of tuples per call).
        self._children: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
        self._labelled: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: only for bounded label values (configured names, outcomes)."""
        key = (id(metric), labels)  # the metrics live as long as this object
        child = self._labelled.get(key)
        if child is None:
            child = self._labelled[key] = metric.labels(*labels)
        return child

    def in_flight_of(self, model: str | None) -> Any:
        """gateway_requests_in_flight{model} (begin/finalize: the model is a configured name)."""
        return self._child(self.in_flight, model or UNKNOWN_MODEL)

    def model_label(self, model: str | None) -> str:
        return model if model in self._models else UNKNOWN_MODEL

    def observe(self, rec: RequestRecord) -> None:
        """Every metric of one finished request, from its record."""
        model = self.model_label(rec.routing.served_model or rec.identity.requested_model)
        dep = rec.routing.deployment if rec.routing.deployment in self._deployments else NO_DEPLOYMENT
        key = (model, dep, rec.identity.tenant, rec.end.status)
        c = self._children.get(key)
        if c is None:
            mdt = (model, dep, rec.identity.tenant)
            c = (self.requests.labels(*mdt, str(rec.end.status)), self.prompt_tokens.labels(*mdt),
                 self.completion_tokens.labels(*mdt), self.cached_tokens.labels(*mdt), self.cost.labels(*mdt),
                 self.e2e.labels(model, dep), self.ttft.labels(model, dep), self.tpot.labels(model, dep),
                 self.overhead.labels(model, dep), self.queue.labels(model, dep))
            self._children[key] = c
        c[0].inc()
        self._child(self.outcomes, model, rec.end.outcome).inc()  # outcomes are record.OUTCOMES
        self._tokens(rec, model, c)
        self._money_and_routing(rec, model, dep, c[4])
        self._waste(rec)
        self._latency(rec, c)
        if rec.routing.task_decision is not None:
            self._task_auto(rec)
        self._scheduling(rec, dep)

    def _task_auto(self, rec: RequestRecord) -> None:
        """A request of a task_auto route (route and task labels are configured names or generation tasks)."""
        r, route = rec.routing, rec.routing.route or "_none"
        self._child(self.route_decisions, route, "task_auto", r.task or "none", r.task_decision or "none").inc()
        if r.task_confidence is not None:
            best = r.task if r.task is not None else r.task_best or "none"
            self._child(self.task_confidence, route, best).observe(r.task_confidence)
        if r.task_decision not in ("declared", "not_ready", "no_text"):
            self._child(self.routing_seconds, route).observe(rec.timing.routing_s)
        if rec.usage.routing_tokens:
            self._child(self.routing_tokens, route, "request").inc(rec.usage.routing_tokens)
        m = rec.money
        if m.cost_pico_usd:
            self._child(self.task_auto_cost, route, "billed").inc(usd(m.cost_pico_usd))
        if m.counterfactual_cost_pico_usd:
            self._child(self.task_auto_cost, route, "counterfactual").inc(usd(m.counterfactual_cost_pico_usd))
        if m.routing_cost_pico_usd:
            self._child(self.task_auto_cost, route, "routing").inc(usd(m.routing_cost_pico_usd))

    def _scheduling(self, rec: RequestRecord, dep: str) -> None:
        r = rec.routing
        if r.deployment is not None:
            self._child(self.tenant_queue, dep, rec.identity.tenant).observe(rec.timing.queue_s)
        if r.priority_class is None or r.slo_ttft_ms is None:
            return
        if r.slo_result is not None:
            self._child(self.slo_requests, r.priority_class, r.slo_result).inc()
        if r.slo_predicted_ms is not None and rec.timing.ttft_s is not None and rec.end.status == 200:
            self._child(self.slo_error, r.priority_class).observe(abs(rec.timing.ttft_s - r.slo_predicted_ms / 1e3))

    def _tokens(self, rec: RequestRecord, model: str, c: tuple[Any, ...]) -> None:
        _, prompt, completion, cached = c[:4]
        if rec.end.cache == "hit":  # vLLM processed none of a hit's tokens: they go to gateway_cache_tokens_total
            self.cache_tokens.labels(model, rec.identity.tenant, "prompt").inc(rec.usage.prompt_tokens)
            self.cache_tokens.labels(model, rec.identity.tenant, "completion").inc(rec.usage.completion_tokens)
            return
        if rec.usage.prompt_tokens:
            prompt.inc(rec.usage.prompt_tokens)
        if rec.usage.completion_tokens:
            completion.inc(rec.usage.completion_tokens)
        if rec.usage.cached_tokens:
            cached.inc(rec.usage.cached_tokens)

    def _money_and_routing(self, rec: RequestRecord, model: str, dep: str, cost: Any) -> None:
        if rec.end.cache is not None:
            self.cache_requests.labels(model, rec.identity.tenant, rec.end.cache).inc()
            if rec.money.saved_pico_usd:
                self.cache_saved.labels(model, rec.identity.tenant).inc(usd(rec.money.saved_pico_usd))
        if rec.end.limited_by is not None and rec.end.limited_by != "skipped":
            self.ratelimit_refusals.labels(rec.identity.tenant, rec.end.limited_by).inc()
        if rec.money.cost_pico_usd:
            cost.inc(usd(rec.money.cost_pico_usd))
        if rec.usage.fanout_prompt_tokens:
            self.fanout_prompt_tokens.labels(model, dep, rec.identity.tenant).inc(rec.usage.fanout_prompt_tokens)
        if rec.money.prefix_saved_pico_usd:
            self.prefix_saved.labels(model, dep, rec.identity.tenant).inc(usd(rec.money.prefix_saved_pico_usd))
        if rec.routing.balance is not None:
            self.balance_decisions.labels(model, dep, rec.routing.balance).inc()
        if rec.money.counterfactual_cost_pico_usd:
            self.counterfactual_cost.labels(model, dep, rec.identity.tenant).inc(
                usd(rec.money.counterfactual_cost_pico_usd))
        r = rec.routing
        if r.primary_model is not None and r.served_model is not None and r.primary_model != r.served_model:
            self.fallbacks.labels(r.primary_model, r.served_model, r.rule or "unknown").inc()

    def _waste(self, rec: RequestRecord) -> None:
        """What vLLM did for attempts the gateway abandoned (a client gone early is billed instead)."""
        for a in rec.routing.attempts:
            if a.outcome == "ok" or not (a.prompt_tokens or a.completion_tokens or a.cost_pico_usd):
                continue
            if a.outcome == "abandoned" and rec.end.outcome == "client_left_before_response":
                continue  # billed to the request, not waste
            wl = (self.model_label(a.public_model), a.deployment if a.deployment in self._deployments
                  else NO_DEPLOYMENT, a.outcome)
            self.wasted_prompt_tokens.labels(*wl).inc(a.prompt_tokens + a.fanout_prompt_tokens)
            self.wasted_completion_tokens.labels(*wl).inc(a.completion_tokens)
            if a.cost_pico_usd:
                self.wasted_cost.labels(*wl).inc(usd(a.cost_pico_usd))

    @staticmethod
    def _latency(rec: RequestRecord, c: tuple[Any, ...]) -> None:
        """The latency histograms; a traced request's trace id goes with them as an exemplar (a panel can
        jump from a slow bucket to its trace). Multiprocess mode keeps no exemplars (prometheus-client)."""
        e2e, ttft, tpot, overhead, queue = c[5:]
        ex = rec.trace.exemplar if rec.trace is not None else None
        e2e.observe(rec.timing.e2e_s, ex)
        overhead.observe(rec.timing.overhead_s, ex)
        if rec.routing.deployment is not None:
            queue.observe(rec.timing.queue_s, ex)
        if rec.timing.ttft_s is not None:
            ttft.observe(rec.timing.ttft_s, ex)
        if rec.timing.tpot_s is not None:
            tpot.observe(rec.timing.tpot_s, ex)

    def render(self, openmetrics_format: bool = False) -> bytes:
        """Prometheus text format, or OpenMetrics (with exemplars) for a scraper that asks for it."""
        self.spend.roll()  # a quiet tenant's spend of a period that has ended reads 0 (see TenantSpend)
        generate = openmetrics.generate_latest if openmetrics_format else generate_latest
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate(registry)
        return generate(self.registry)


def period_index(period: str, now: float) -> int:
    """Which UTC day / calendar month `now` falls in (the budget keys in Redis are per period the same way)."""
    if period == "day":
        return int(now // 86400)
    t = time.gmtime(now)
    return t.tm_year * 12 + t.tm_mon


class TenantSpend:
    """gateway_tenant_spend_usd as it is at scrape time, not as last seen.

    The gauge is set from Redis's answer to a tenant's request; a tenant gone quiet sends none, so
    without this yesterday's spend would stand (and budget alerts fire) all through the next day. Each
    figure remembers its period; `roll()` (at every scrape, and every ROLL_EVERY_S in every worker for
    the multiprocess files) sets the figures of periods that have ended to 0, the spend of the new one."""

    ROLL_EVERY_S = 30.0

    def __init__(self, gauge: Gauge, clock: Callable[[], float] = time.time) -> None:
        self.gauge = gauge
        self.clock = clock  # tests move it past midnight
        self._seen: dict[tuple[str, str], int] = {}  # (tenant, period) -> period index of the figure shown

    def seen(self, tenant: str, period: str, usd_value: float) -> None:
        self._seen[(tenant, period)] = period_index(period, self.clock())
        self.gauge.labels(tenant, period).set(usd_value)

    def roll(self) -> None:
        now = self.clock()
        for (tenant, period), idx in list(self._seen.items()):
            current = period_index(period, now)
            if idx != current:
                self._seen[(tenant, period)] = current
                self.gauge.labels(tenant, period).set(0)

    async def keep_rolled(self) -> None:
        while True:
            await asyncio.sleep(self.ROLL_EVERY_S)
            self.roll()


class _AsyncioTasks:
    """gateway_asyncio_tasks: tasks alive in this worker's event loop (a leak shows as growth)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            n = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop (collected outside the server)
            n = 0
        yield GaugeMetricFamily("gateway_asyncio_tasks", "asyncio tasks alive in this worker", value=n)

    def describe(self) -> list[GaugeMetricFamily]:
        return []

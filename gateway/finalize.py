"""Finalize stage: usage -> cost, then the record -> headers, JSON log line and metrics, in one place."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO

import orjson

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.money import usd_text
from gateway.pricing import prefix_cache_saving, request_cost
from gateway.record import Attempt, RequestRecord

log = logging.getLogger("gateway.finalize")


class RequestLog:
    """One JSON line per request, without prompt or completion text."""

    def __init__(self, target: str) -> None:
        self._out: IO[bytes] | None
        if target == "off":
            self._out = None
        elif target == "stdout":
            self._out = sys.stdout.buffer
        elif target == "stderr":
            self._out = sys.stderr.buffer
        else:
            self._out = open(target, "ab")  # noqa: SIM115 - lives as long as the app

    def write(self, line: bytes) -> None:
        if self._out is not None:
            self._out.write(line + b"\n")
            self._out.flush()

    def close(self) -> None:
        if self._out is not None and self._out not in (sys.stdout.buffer, sys.stderr.buffer):
            self._out.close()


class Finalizer:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics, request_log: RequestLog) -> None:
        self.config = config
        self.metrics = metrics
        self.request_log = request_log
        self.observers: list[Callable[[RequestRecord], None]] = []  # e.g. live latency figures for routing
        # Where the record's JSON line goes, serialized once: the request log, the usage ledger.
        self.record_sinks: list[Callable[[bytes], None]] = [request_log.write]

    def price(self, rec: RequestRecord) -> None:
        """Exact cost of what the request used, of what its abandoned attempts wasted, and the counterfactual;
        deciding its route (task_auto's embedding call) is part of its cost, whatever answered it, and so is
        the adapter load it caused when the operator bills cold starts to requests."""
        self._price_served(rec)
        rec.money.cost_pico_usd += rec.money.routing_cost_pico_usd
        if rec.money.adapter_load_cost_pico_usd and self.config.adapter_placement.cold_start_billing == "request":
            rec.money.cost_pico_usd += rec.money.adapter_load_cost_pico_usd

    def _price_served(self, rec: RequestRecord) -> None:
        if rec.end.cache == "hit":  # served from the gateway cache: free; rec.money.saved_pico_usd holds what it cost
            rec.money.cost_pico_usd = rec.money.counterfactual_cost_pico_usd = 0
            return
        models = self.config.models
        billed_gpu_s = 0.0
        for a in rec.routing.attempts:
            if a.outcome == "ok":
                billed_gpu_s += a.gpu_s
            elif a.outcome == "abandoned" and rec.end.outcome == "client_left_before_response":
                # The client left while vLLM was working for it: what vLLM did is the request's own.
                billed_gpu_s += a.gpu_s
                rec.usage.prompt_tokens += a.prompt_tokens
                rec.usage.fanout_prompt_tokens += a.fanout_prompt_tokens
                rec.usage.completion_tokens += a.completion_tokens
                rec.usage.usage_reported = rec.usage.usage_reported or a.usage == "reported"
            else:
                self._price_waste(rec, a)
        rec.timing.gpu_s = billed_gpu_s
        model = models.get(rec.routing.served_model or "")
        if model is None:  # nothing served: the request itself used nothing it is billed for
            model = models.get(rec.routing.primary_model or rec.identity.requested_model or "")
            if model is None or not (rec.usage.prompt_tokens or rec.usage.completion_tokens or billed_gpu_s):
                return
        u, money = rec.usage, rec.money
        money.cost_pico_usd = request_cost(model.pricing, u.prompt_tokens, u.completion_tokens, u.cached_tokens,
                                           billed_gpu_s)
        money.prefix_saved_pico_usd = prefix_cache_saving(model.pricing, u.prompt_tokens, u.cached_tokens)
        primary = models.get(rec.routing.primary_model or "", model)
        money.counterfactual_cost_pico_usd = money.cost_pico_usd if primary is model else request_cost(
            primary.pricing, u.prompt_tokens, u.completion_tokens, u.cached_tokens, billed_gpu_s)

    def _price_waste(self, rec: RequestRecord, a: Attempt) -> None:
        model = self.config.models.get(a.public_model or "")
        if model is None:
            return
        a.cost_pico_usd = request_cost(model.pricing, a.prompt_tokens, a.completion_tokens, 0, a.gpu_s)
        rec.usage.wasted_prompt_tokens += a.prompt_tokens + a.fanout_prompt_tokens
        rec.usage.wasted_completion_tokens += a.completion_tokens
        rec.money.wasted_cost_pico_usd += a.cost_pico_usd

    def begin(self, rec: RequestRecord) -> None:
        """The request names a configured model: count it in flight until finalized."""
        rec.in_flight = True
        self.metrics.in_flight_of(rec.identity.requested_model).inc()

    def finalize(self, rec: RequestRecord) -> bytes:
        """Called once per request whatever happened to it (a second call returns the first line)."""
        if rec.final_line is not None:
            return rec.final_line
        if rec.in_flight:
            rec.in_flight = False
            self.metrics.in_flight_of(rec.identity.requested_model).dec()
        rec.finish()
        self.price(rec)
        rec.judge_slo()
        line = rec.final_line = orjson.dumps(rec.to_log())
        # Each sink fails alone: a full disk under the log must not cost the ledger record or the settle.
        for sink in (self.metrics.observe, *self.observers):
            try:
                sink(rec)
            except Exception:  # noqa: BLE001 - accounting must never break serving; logged
                log.exception("record sink %s failed for request %s", getattr(sink, "__qualname__", sink),
                              rec.identity.request_id)
        for write in self.record_sinks:
            try:
                write(line)
            except Exception:  # noqa: BLE001
                log.exception("record sink %s failed for request %s", getattr(write, "__qualname__", write),
                              rec.identity.request_id)
        return line


def early_headers(rec: RequestRecord) -> dict[str, str]:
    """What is known before the first byte of a response."""
    h = {"x-request-id": rec.identity.request_id}
    if rec.routing.served_model is not None:
        h["x-gateway-model"] = rec.routing.served_model
        h["x-gateway-upstream-model"] = rec.routing.upstream_model or ""
        h["x-gateway-deployment"] = rec.routing.deployment or ""
        h["x-gateway-attempts"] = str(len(rec.routing.attempts))
        h["x-gateway-queue-ms"] = f"{rec.timing.queue_s * 1e3:.3f}"
        if rec.routing.balance is not None:
            h["x-gateway-balance"] = rec.routing.balance
        if rec.routing.task is not None:
            h["x-gateway-task"] = rec.routing.task
        if rec.routing.route is not None:
            h["x-gateway-route"] = f"{rec.routing.route} -> {rec.routing.served_model}"
        if rec.routing.rule is not None:
            h["x-gateway-rule"] = rec.routing.rule
        if rec.routing.fallback_reason is not None:
            h["x-gateway-fallback-reason"] = rec.routing.fallback_reason
    if rec.routing.task_decision is not None:  # a task_auto route: how the task was decided, and what it took
        h["x-gateway-task-decision"] = rec.routing.task_decision
        if rec.routing.task_confidence is not None:
            h["x-gateway-task-confidence"] = f"{rec.routing.task_confidence:.4f}"
        h["x-gateway-routing-ms"] = f"{rec.timing.routing_s * 1e3:.3f}"
        h["x-gateway-routing-tokens"] = str(rec.usage.routing_tokens)
        h["x-gateway-routing-cost-usd"] = usd_text(rec.money.routing_cost_pico_usd)
    if rec.routing.adapter_load is not None:
        h["x-gateway-adapter-load"] = rec.routing.adapter_load
        h["x-gateway-adapter-load-ms"] = f"{rec.timing.adapter_load_s * 1e3:.3f}"
    if rec.end.cache is not None:
        h["x-gateway-cache"] = rec.end.cache
        if rec.end.cache == "hit":
            h["x-gateway-saved-usd"] = usd_text(rec.money.saved_pico_usd)
    if rec.ratelimit_headers:
        h.update(rec.ratelimit_headers)
    return h


def final_headers(rec: RequestRecord) -> dict[str, str]:
    """Everything, once the request is finished (non-streaming responses and errors)."""
    h = early_headers(rec)
    h["x-gateway-tenant"] = rec.identity.tenant
    h["x-gateway-e2e-ms"] = f"{rec.timing.e2e_s * 1e3:.3f}"
    h["x-gateway-upstream-ms"] = f"{rec.timing.upstream_s * 1e3:.3f}"
    h["x-gateway-overhead-ms"] = f"{rec.timing.overhead_s * 1e3:.3f}"
    if rec.usage.usage_reported:
        h["x-gateway-prompt-tokens"] = str(rec.usage.prompt_tokens)
        h["x-gateway-completion-tokens"] = str(rec.usage.completion_tokens)
        h["x-gateway-cached-tokens"] = str(rec.usage.cached_tokens)
        h["x-gateway-cost-usd"] = usd_text(rec.money.cost_pico_usd)
        if rec.money.prefix_saved_pico_usd:
            h["x-gateway-prefix-saved-usd"] = usd_text(rec.money.prefix_saved_pico_usd)
        if rec.usage.fanout_prompt_tokens:
            h["x-gateway-fanout-prompt-tokens"] = str(rec.usage.fanout_prompt_tokens)
        if rec.routing.primary_model is not None and rec.routing.primary_model != rec.routing.served_model:
            h["x-gateway-counterfactual-cost-usd"] = usd_text(rec.money.counterfactual_cost_pico_usd)
    if rec.usage.wasted_prompt_tokens or rec.usage.wasted_completion_tokens:
        h["x-gateway-wasted-prompt-tokens"] = str(rec.usage.wasted_prompt_tokens)
        h["x-gateway-wasted-completion-tokens"] = str(rec.usage.wasted_completion_tokens)
        h["x-gateway-wasted-cost-usd"] = usd_text(rec.money.wasted_cost_pico_usd)
    return h


def stream_trailer(record_line: bytes) -> bytes:
    """The final figures of a stream (the record's JSON line), as an SSE comment just before `data: [DONE]`."""
    return b": x-gateway-accounting " + record_line + b"\n\n"

"""Finalize stage: usage -> cost, then the record -> headers, JSON log line and metrics, in one place."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO

import orjson

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.money import usd
from gateway.pricing import prefix_cache_saving_pico, request_cost
from gateway.record import RequestRecord

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
        if rec.cache == "hit":  # served from the gateway cache: free; rec.saved_usd holds what it cost
            rec.cost_usd = rec.counterfactual_cost_usd = 0.0
            return
        models = self.config.models
        model = models.get(rec.served_model or "")
        if model is not None:
            rec.cost_usd = request_cost(model.pricing, rec.prompt_tokens, rec.completion_tokens,
                                        rec.cached_tokens, rec.upstream_s, rec.concurrency)
            rec.prefix_saved_pico_usd = prefix_cache_saving_pico(model.pricing, rec.cached_tokens)
            rec.prefix_saved_usd = usd(rec.prefix_saved_pico_usd)
            primary = models.get(rec.primary_model or "", model)
            rec.counterfactual_cost_usd = rec.cost_usd if primary is model else request_cost(
                primary.pricing, rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.upstream_s,
                rec.concurrency)

    def begin(self, rec: RequestRecord) -> None:
        """The request names a configured model: count it in flight until finalized."""
        rec.in_flight = True
        self.metrics.in_flight.labels(rec.requested_model).inc()

    def finalize(self, rec: RequestRecord) -> bytes:
        """Called exactly once per request, whatever happened to it; returns the record's JSON line."""
        if rec.in_flight:
            rec.in_flight = False
            self.metrics.in_flight.labels(rec.requested_model).dec()
        rec.finish()
        self.price(rec)
        line = orjson.dumps(rec.to_log())
        try:
            self.metrics.observe(rec)
            for sink in self.record_sinks:
                sink(line)
            for observe in self.observers:
                observe(rec)
        except Exception:  # accounting must never break serving; the failure itself is logged
            log.exception("could not write the record of request %s", rec.request_id)
        return line


def early_headers(rec: RequestRecord) -> dict[str, str]:
    """What is known before the first byte of a response."""
    h = {"x-request-id": rec.request_id}
    if rec.served_model is not None:
        h["x-gateway-model"] = rec.served_model
        h["x-gateway-upstream-model"] = rec.upstream_model or ""
        h["x-gateway-deployment"] = rec.deployment or ""
        h["x-gateway-attempts"] = str(len(rec.attempts))
        h["x-gateway-queue-ms"] = f"{rec.queue_s * 1e3:.3f}"
        if rec.balance is not None:
            h["x-gateway-balance"] = rec.balance
        if rec.route is not None:
            h["x-gateway-route"] = f"{rec.route} -> {rec.served_model}"
        if rec.rule is not None:
            h["x-gateway-rule"] = rec.rule
        if rec.fallback_reason is not None:
            h["x-gateway-fallback-reason"] = rec.fallback_reason
    if rec.cache is not None:
        h["x-gateway-cache"] = rec.cache
        if rec.cache == "hit":
            h["x-gateway-saved-usd"] = f"{rec.saved_usd:.10f}"
    if rec.ratelimit_headers:
        h.update(rec.ratelimit_headers)
    return h


def final_headers(rec: RequestRecord) -> dict[str, str]:
    """Everything, once the request is finished (non-streaming responses and errors)."""
    h = early_headers(rec)
    h["x-gateway-tenant"] = rec.tenant
    h["x-gateway-e2e-ms"] = f"{rec.e2e_s * 1e3:.3f}"
    h["x-gateway-upstream-ms"] = f"{rec.upstream_s * 1e3:.3f}"
    h["x-gateway-overhead-ms"] = f"{rec.overhead_s * 1e3:.3f}"
    if rec.usage_reported:
        h["x-gateway-prompt-tokens"] = str(rec.prompt_tokens)
        h["x-gateway-completion-tokens"] = str(rec.completion_tokens)
        h["x-gateway-cached-tokens"] = str(rec.cached_tokens)
        if rec.prefix_saved_pico_usd:
            h["x-gateway-prefix-saved-usd"] = f"{rec.prefix_saved_usd:.10f}"
        h["x-gateway-cost-usd"] = f"{rec.cost_usd:.10f}"
        if rec.primary_model is not None and rec.primary_model != rec.served_model:
            h["x-gateway-counterfactual-cost-usd"] = f"{rec.counterfactual_cost_usd:.10f}"
    return h


def stream_trailer(record_line: bytes) -> bytes:
    """The final figures of a stream (the record's JSON line), as an SSE comment just before `data: [DONE]`."""
    return b": x-gateway-accounting " + record_line + b"\n\n"

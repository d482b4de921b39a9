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
        """Exact cost of what the request used, of what its abandoned attempts wasted, and the counterfactual."""
        if rec.cache == "hit":  # served from the gateway cache: free; rec.saved_pico_usd holds what it cost
            rec.cost_pico_usd = rec.counterfactual_cost_pico_usd = 0
            return
        models = self.config.models
        billed_gpu_s = 0.0
        for a in rec.attempts:
            if a.outcome == "ok":
                billed_gpu_s += a.gpu_s
            elif a.outcome == "abandoned" and rec.outcome == "client_left_before_response":
                # The client left while vLLM was working for it: what vLLM did is the request's own.
                billed_gpu_s += a.gpu_s
                rec.prompt_tokens += a.prompt_tokens
                rec.fanout_prompt_tokens += a.fanout_prompt_tokens
                rec.completion_tokens += a.completion_tokens
                rec.usage_reported = rec.usage_reported or a.usage == "reported"
            else:
                self._price_waste(rec, a)
        rec.gpu_s = billed_gpu_s
        model = models.get(rec.served_model or "")
        if model is None:  # nothing served: the request itself used nothing it is billed for
            model = models.get(rec.primary_model or rec.requested_model or "")
            if model is None or not (rec.prompt_tokens or rec.completion_tokens or billed_gpu_s):
                return
        rec.cost_pico_usd = request_cost(model.pricing, rec.prompt_tokens, rec.completion_tokens,
                                         rec.cached_tokens, billed_gpu_s)
        rec.prefix_saved_pico_usd = prefix_cache_saving(model.pricing, rec.prompt_tokens, rec.cached_tokens)
        primary = models.get(rec.primary_model or "", model)
        rec.counterfactual_cost_pico_usd = rec.cost_pico_usd if primary is model else request_cost(
            primary.pricing, rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, billed_gpu_s)

    def _price_waste(self, rec: RequestRecord, a: Attempt) -> None:
        model = self.config.models.get(a.public_model or "")
        if model is None:
            return
        a.cost_pico_usd = request_cost(model.pricing, a.prompt_tokens, a.completion_tokens, 0, a.gpu_s)
        rec.wasted_prompt_tokens += a.prompt_tokens + a.fanout_prompt_tokens
        rec.wasted_completion_tokens += a.completion_tokens
        rec.wasted_cost_pico_usd += a.cost_pico_usd

    def begin(self, rec: RequestRecord) -> None:
        """The request names a configured model: count it in flight until finalized."""
        rec.in_flight = True
        self.metrics.in_flight.labels(rec.requested_model).inc()

    def finalize(self, rec: RequestRecord) -> bytes:
        """Called once per request whatever happened to it (a second call returns the first line)."""
        if rec.final_line is not None:
            return rec.final_line
        if rec.in_flight:
            rec.in_flight = False
            self.metrics.in_flight.labels(rec.requested_model).dec()
        rec.finish()
        self.price(rec)
        line = rec.final_line = orjson.dumps(rec.to_log())
        # Each sink fails alone: a full disk under the log must not cost the ledger record or the settle.
        for sink in (self.metrics.observe, *self.observers):
            try:
                sink(rec)
            except Exception:  # noqa: BLE001 - accounting must never break serving; logged
                log.exception("record sink %s failed for request %s", getattr(sink, "__qualname__", sink),
                              rec.request_id)
        for write in self.record_sinks:
            try:
                write(line)
            except Exception:  # noqa: BLE001
                log.exception("record sink %s failed for request %s", getattr(write, "__qualname__", write),
                              rec.request_id)
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
            h["x-gateway-saved-usd"] = usd_text(rec.saved_pico_usd)
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
        h["x-gateway-cost-usd"] = usd_text(rec.cost_pico_usd)
        if rec.prefix_saved_pico_usd:
            h["x-gateway-prefix-saved-usd"] = usd_text(rec.prefix_saved_pico_usd)
        if rec.fanout_prompt_tokens:
            h["x-gateway-fanout-prompt-tokens"] = str(rec.fanout_prompt_tokens)
        if rec.primary_model is not None and rec.primary_model != rec.served_model:
            h["x-gateway-counterfactual-cost-usd"] = usd_text(rec.counterfactual_cost_pico_usd)
    if rec.wasted_prompt_tokens or rec.wasted_completion_tokens:
        h["x-gateway-wasted-prompt-tokens"] = str(rec.wasted_prompt_tokens)
        h["x-gateway-wasted-completion-tokens"] = str(rec.wasted_completion_tokens)
        h["x-gateway-wasted-cost-usd"] = usd_text(rec.wasted_cost_pico_usd)
    return h


def stream_trailer(record_line: bytes) -> bytes:
    """The final figures of a stream (the record's JSON line), as an SSE comment just before `data: [DONE]`."""
    return b": x-gateway-accounting " + record_line + b"\n\n"

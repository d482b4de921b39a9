"""Traces: one OpenTelemetry trace per request (GenAI semantic conventions), joined with vLLM's own span.

Off unless configured (`tracing.otlp_endpoint`, or the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT): then
`build_tracing` returns None, nothing of OpenTelemetry is imported, every record's `trace` stays None and each
stage pays one None check. On, each request gets a SERVER span (continuing a valid client `traceparent`; a
malformed one starts a new trace), child spans for its stages (admission: authentication, plan and limits;
the cache lookup when there was one; waiting in the queue; each upstream attempt; the stream) and events for
fallback decisions. Spans are few on purpose: each costs tens of microseconds of CPU in the Python SDK.
Every attempt sends vLLM a `traceparent` naming the attempt span, so vLLM's `llm_request` span is its child.
Spans leave through a BatchSpanProcessor (a background thread; a full queue drops spans, never blocks).
Attributes are counts, names and times: never prompt or completion text.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.config import GatewayConfig, TracingSpec
    from gateway.record import Attempt, RequestRecord

log = logging.getLogger("gateway.tracing")

# The GenAI operation each endpoint performs (gen_ai.operation.name); others use the endpoint's name.
OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat",
             "messages": "chat"}
PROVIDER = "vllm"  # gen_ai.provider.name: every deployment is a vLLM server
# Numeric request parameters copied to the span (never text): body key -> attribute.
REQUEST_PARAMS = {"max_tokens": "gen_ai.request.max_tokens", "max_completion_tokens": "gen_ai.request.max_tokens",
                  "temperature": "gen_ai.request.temperature", "top_p": "gen_ai.request.top_p",
                  "top_k": "gen_ai.request.top_k", "n": "gen_ai.request.choice.count",
                  "seed": "gen_ai.request.seed", "frequency_penalty": "gen_ai.request.frequency_penalty",
                  "presence_penalty": "gen_ai.request.presence_penalty"}
# Every gen_ai.* / server.* / error.* name used here (tests/test_tracing.py checks them against the registry).
SEMCONV_NAMES = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
                 "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
                 "gen_ai.request.stream", *sorted(set(REQUEST_PARAMS.values())), "server.address", "server.port",
                 "error.type", "http.response.status_code", "http.request.method", "url.path")


def _env_enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def build_tracing(config: GatewayConfig) -> Tracing | None:
    """The worker's tracer, or None when tracing is off (neither config nor OTEL_* environment asks for it)."""
    spec = config.tracing
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if spec.otlp_endpoint is None and not _env_enabled():
        return None
    return Tracing(config, spec)


def _traces_url(endpoint: str) -> str:
    """OTLP/HTTP: a bare base URL (http://collector:4318) gets the traces path, as the OTEL_ variables do."""
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


class Tracing:
    """This worker's TracerProvider (OTLP/HTTP exporter, batch processor) and the request traces it starts."""

    def __init__(self, config: GatewayConfig, spec: TracingSpec) -> None:
        # Imported here: without tracing the gateway never loads OpenTelemetry (the `tracing` extra).
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not supported by the gateway; exporting with http/protobuf", protocol)
        sampler = None if spec.sample_ratio is None else ParentBased(TraceIdRatioBased(spec.sample_ratio))
        attrs: dict[str, Any] = {"service.instance.id": f"{os.uname().nodename}-{os.getpid()}"}
        if spec.service_name is not None or not os.environ.get("OTEL_SERVICE_NAME"):
            attrs["service.name"] = spec.service_name or "vllm-gateway"
        resource = Resource.create(attrs)  # also reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        self.provider = TracerProvider(resource=resource, sampler=sampler)  # sampler None: OTEL_TRACES_SAMPLER
        exporter = OTLPSpanExporter(endpoint=_traces_url(spec.otlp_endpoint) if spec.otlp_endpoint else None,
                                    headers=dict(spec.headers) or None, timeout=spec.export_timeout_s)
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=spec.max_queue_size, schedule_delay_millis=spec.schedule_delay_ms,
            max_export_batch_size=min(512, spec.max_queue_size)))
        self.tracer = self.provider.get_tracer("vllm-gateway")
        self.in_context = set_span_in_context
        self.propagator = TraceContextTextMapPropagator()
        self.SERVER, self.CLIENT, self.INTERNAL = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL
        self.error = Status(StatusCode.ERROR)
        # Where each deployment lives (server.address / server.port), parsed once.
        self.servers: dict[str, tuple[str, int]] = {}
        for m in config.models.values():
            for d in m.deployments:
                u = urlsplit(d.url)
                self.servers[d.name] = (u.hostname or "", u.port or (443 if u.scheme == "https" else 80))

    def begin(self, rec: RequestRecord, headers: dict[bytes, bytes], method: str, path: str) -> None:
        """Open the request's server span: a child of a valid client `traceparent`, else a new trace's root."""
        parent = None
        if (tp := headers.get(b"traceparent")) is not None:
            carrier = {"traceparent": tp.decode("latin-1")}
            if (ts := headers.get(b"tracestate")) is not None:
                carrier["tracestate"] = ts.decode("latin-1")
            parent = self.propagator.extract(carrier)  # malformed: an empty context (ignored, not an error)
        endpoint = rec.identity.endpoint
        op = OPERATION.get(endpoint, endpoint)
        span = self.tracer.start_span(f"{op}", context=parent, kind=self.SERVER, attributes={
            "gen_ai.operation.name": op, "gen_ai.provider.name": PROVIDER, "http.request.method": method,
            "url.path": path, "gateway.request_id": rec.identity.request_id, "gateway.endpoint": endpoint})
        # A request sampled out (ratio, or the client's flag) builds no further spans: it only passes the context on.
        rec.trace = RequestTrace(self, span, op) if span.is_recording() else UnsampledTrace(self, span, op)

    def shutdown(self) -> None:
        """Export what is still queued (bounded by the exporter's timeout), then stop the export thread."""
        self.provider.shutdown()


class RequestTrace:
    """One request's spans. Stages run one after another, so one `current` stage span is open at a time."""

    __slots__ = ("tracing", "server", "ctx", "op", "current", "attempt", "attempt_end_ns", "traceparent",
                 "tracestate", "stream", "exemplar")

    def __init__(self, tracing: Tracing, server: Span, op: str) -> None:
        self.tracing = tracing
        self.server = server
        self.ctx = tracing.in_context(server)
        self.op = op
        self.current: Span | None = None
        self.attempt: Span | None = None  # the attempt that answered, ended with the record's usage
        self.attempt_end_ns: int | None = None
        self.traceparent = ""  # what the attempt being made sends vLLM (and the client's tracestate, if any)
        self.tracestate: str | None = None
        self.stream: Span | None = None
        sc = server.get_span_context()
        # prometheus exemplar: only for a trace that is kept (a sampled-out id would lead nowhere)
        self.exemplar = {"trace_id": f"{sc.trace_id:032x}"} if sc.trace_flags.sampled else None

    # ---- stages
    def stage(self, name: str | None) -> None:
        """End the stage span open now (if any) and start `name` (None: no stage open)."""
        if self.current is not None:
            self.current.end()
            self.current = None
        if name is not None:
            self.current = self.tracing.tracer.start_span(name, context=self.ctx, kind=self.tracing.INTERNAL)

    def lookup_starts(self) -> int:
        """The cache stage begins (admission is over): its start, for looked_up."""
        self.stage(None)
        return time.time_ns()

    def looked_up(self, rec: RequestRecord, started_ns: int) -> None:
        """A span for the cache lookup only where there was one (hit or miss: a store round trip)."""
        if rec.end.cache in ("hit", "miss"):
            span = self.tracing.tracer.start_span("gateway.cache", context=self.ctx, kind=self.tracing.INTERNAL,
                                                  start_time=started_ns, attributes={"gateway.cache": rec.end.cache})
            span.end()

    def request(self, rec: RequestRecord, body: dict[str, Any]) -> None:
        """What the request asked for: model, stream, numeric sampling parameters; the plan's decisions."""
        s = self.server
        s.update_name(f"{self.op} {rec.identity.requested_model}")
        s.set_attribute("gen_ai.request.model", rec.identity.requested_model or "")
        stream = body.get("stream")
        s.set_attribute("gen_ai.request.stream", stream is True)
        params = {attr: v for key, attr in REQUEST_PARAMS.items()
                  if (v := body.get(key)) is not None and type(v) in (int, float)}  # not bool, never text
        if params:
            s.set_attributes(params)
        r = rec.routing
        if r.route is not None:
            s.set_attribute("gateway.route", r.route)
        for decision in r.route_decisions:
            s.add_event("gateway.route_decision", {"gateway.decision": decision})

    # ---- attempts (gateway/execute.py)
    def start_attempt(self, att: Attempt, number: int, op_model: str) -> Span:
        t = self.tracing
        host, port = t.servers.get(att.deployment, ("", 0))
        span = t.tracer.start_span(f"{self.op} {op_model}", context=self.ctx, kind=t.CLIENT, attributes={
            "gen_ai.operation.name": self.op, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": op_model,
            "server.address": host, "server.port": port, "gateway.deployment": att.deployment,
            "gateway.model": att.public_model or "", "gateway.attempt": number})
        self.attempt_end_ns = None  # a failed attempt before this one may have set it (its slot was freed)
        sc = span.get_span_context()
        self.traceparent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
        if sc.trace_state:
            self.tracestate = sc.trace_state.to_header()
        return span

    def queue(self, attempt: Span) -> Span:
        return self.tracing.tracer.start_span("gateway.queue", context=self.tracing.in_context(attempt),
                                              kind=self.tracing.INTERNAL)

    def attempt_failed(self, span: Span, att: Attempt, error_type: str) -> None:
        """An attempt that did not answer: its outcome, what vLLM did for it, and the fallback event."""
        span.set_attribute("gateway.attempt.outcome", att.outcome)
        span.set_attribute("error.type", error_type)
        span.set_attribute("gateway.attempt.usage", att.usage)
        if att.prompt_tokens or att.completion_tokens:
            span.set_attribute("gateway.wasted.prompt_tokens", att.prompt_tokens + att.fanout_prompt_tokens)
            span.set_attribute("gateway.wasted.completion_tokens", att.completion_tokens)
        span.set_status(self.tracing.error)
        span.end()
        self.server.add_event("gateway.fallback", {"gateway.deployment": att.deployment,
                                                   "gateway.attempt.outcome": att.outcome})

    def skipped(self, att: Attempt) -> None:
        self.server.add_event("gateway.deployment_skipped", {"gateway.deployment": att.deployment,
                                                             "gateway.attempt.outcome": att.outcome})

    def answered(self, span: Span, stream: bool) -> None:
        """The attempt answered: it ends with the record's usage (end()); a stream's when its relay ends."""
        span.set_attribute("gateway.attempt.outcome", "ok")
        self.attempt = span
        if not stream:
            self.attempt_end_ns = time.time_ns()

    def attempt_finished(self) -> None:
        if self.attempt_end_ns is None:
            self.attempt_end_ns = time.time_ns()

    # ---- the stream to the client (gateway/pipeline.py)
    def start_stream(self) -> None:
        self.stream = self.tracing.tracer.start_span("gateway.stream", context=self.ctx, kind=self.tracing.INTERNAL)

    # ---- the end: everything else comes from the finished record
    def end(self, rec: RequestRecord) -> None:
        t = self.tracing
        self.stage(None)
        s, r, u, e = self.server, rec.routing, rec.usage, rec.end
        failed = e.status >= 500 or e.outcome == "upstream_failed_midstream"
        if self.stream is not None:
            self.stream.set_attribute("gateway.client_wait_ms", rec.timing.client_wait_s * 1e3)
            if rec.timing.ttft_s is not None:
                self.stream.set_attribute("gateway.ttft_ms", rec.timing.ttft_s * 1e3)
            if failed or e.outcome.startswith("client_left"):
                self.stream.set_attribute("gateway.outcome", e.outcome)
            self.stream.end()
        attrs: dict[str, Any] = {
            "http.response.status_code": e.status, "gateway.tenant": rec.identity.tenant,
            "gateway.outcome": e.outcome, "gateway.cost_pico_usd": rec.money.cost_pico_usd,
            "gateway.attempts": len(r.attempts), "gateway.overhead_ms": rec.timing.overhead_s * 1e3,
            "gateway.queue_ms": rec.timing.queue_s * 1e3}
        if u.usage_reported:
            attrs.update({"gen_ai.usage.input_tokens": u.prompt_tokens, "gen_ai.usage.output_tokens":
                          u.completion_tokens, "gen_ai.usage.cache_read.input_tokens": u.cached_tokens})
        if r.upstream_model is not None:
            attrs["gen_ai.response.model"] = r.upstream_model
        if r.deployment is not None:
            host, port = t.servers.get(r.deployment, ("", 0))
            attrs.update({"server.address": host, "server.port": port, "gateway.deployment": r.deployment,
                          "gateway.served_model": r.served_model or ""})
        for key, value in (("gateway.rule", r.rule), ("gateway.fallback_reason", r.fallback_reason),
                           ("gateway.cache", e.cache), ("gateway.limited_by", e.limited_by),
                           ("gateway.balance", r.balance), ("gateway.task", r.task)):
            if value is not None:
                attrs[key] = value
        if rec.money.wasted_cost_pico_usd:
            attrs["gateway.wasted_cost_pico_usd"] = rec.money.wasted_cost_pico_usd
        if e.status >= 400 or e.outcome != "ok":
            attrs["error.type"] = e.error_code or e.outcome
        s.set_attributes(attrs)
        if self.attempt is not None:
            if u.usage_reported:
                self.attempt.set_attributes({"gen_ai.usage.input_tokens": u.prompt_tokens,
                                             "gen_ai.usage.output_tokens": u.completion_tokens,
                                             "gen_ai.response.model": r.upstream_model or ""})
            self.attempt.end(end_time=self.attempt_end_ns)
        if failed:
            s.set_status(self.tracing.error)
        s.end()


class UnsampledTrace(RequestTrace):
    """A request that is not sampled: no spans (each would cost the sampler's work for nothing), only the
    W3C context passed on to vLLM with the sampled flag off, so that vLLM does not record it either."""

    __slots__ = ()

    def stage(self, name: str | None) -> None:
        pass

    def lookup_starts(self) -> int:
        return 0

    def looked_up(self, rec: RequestRecord, started_ns: int) -> None:
        pass

    def request(self, rec: RequestRecord, body: dict[str, Any]) -> None:
        pass

    def start_attempt(self, att: Attempt, number: int, op_model: str) -> Span | None:  # type: ignore[override]
        if not self.traceparent:
            sc = self.server.get_span_context()
            self.traceparent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
            self.tracestate = sc.trace_state.to_header() if sc.trace_state else None
        return None

    def skipped(self, att: Attempt) -> None:
        pass

    def attempt_finished(self) -> None:
        pass

    def start_stream(self) -> None:
        pass

    def end(self, rec: RequestRecord) -> None:
        pass

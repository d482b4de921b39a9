"""Traces (gateway/tracing.py) against the test upstream: spans exported as OTLP to a receiver, their tree and
attributes, a client's traceparent continued (a malformed one ignored), exemplars, and tracing off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import ConfigError, parse_config
from gateway.tracing import REQUEST_PARAMS, SEMCONV_NAMES, build_tracing
from loadtests.otlp_sink import OtlpSink, SpanData
from tests.conftest import ROOT, FakeUpstream, GatewayProcess

PROMPT = "tell me about the secret project zebra-42"  # must never reach a span
SERVER, CLIENT = 2, 3
ERROR = 2


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    s = OtlpSink()
    yield s
    s.close()


def traced_config(slow_url: str, fast_url: str, sink: OtlpSink, **tracing: Any) -> dict[str, Any]:
    """Route `assistant`: candidate `slow` first (first-token timeout 0.5 s), then `m1`."""
    return {
        "models": {
            "slow": {"prices": {"prompt_per_1m": 10.0, "completion_per_1m": 30.0},
                     "deployments": [{"name": "slow-a", "url": slow_url, "model": "m1",
                                      "timeouts": {"connect": 1, "first_token": 0.5, "total": 10}}]},
            "m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                   "deployments": [{"name": "m1-a", "url": fast_url, "model": "m1"}]},
        },
        "routes": {"assistant": {"candidates": ["slow", "m1"]}},
        "tracing": {"otlp_endpoint": sink.url, "schedule_delay_ms": 100, "service_name": "gw-test", **tracing},
    }


def chat(gw: GatewayProcess, stream: bool, request_id: str, temperature: float = 0.5, **headers: str) -> httpx.Response:
    body = {"model": "assistant", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
            "temperature": temperature, "stream": stream}
    return httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps(body), timeout=30,
                      headers={"Content-Type": "application/json", "X-Request-Id": request_id, **headers})


def sampled(traceparent: str) -> str:
    """The traceparent without its flags, once its sampled bit is checked (the SDK also sets Level 2's
    `random` bit, 0x02)."""
    head, _, flags = traceparent.rpartition("-")
    assert int(flags, 16) & 1, traceparent
    return head


def server_span(spans: list[SpanData], request_id: str) -> SpanData | None:
    return next((s for s in spans if s.kind == SERVER and s.attributes.get("gateway.request_id") == request_id), None)


def whole_trace(sink: OtlpSink, request_id: str, spans_expected: int) -> tuple[SpanData, list[SpanData]]:
    """The request's server span and every span of its trace, once `spans_expected` have arrived."""
    def done(spans: list[SpanData]) -> bool:
        root = server_span(spans, request_id)
        return root is not None and sum(s.trace_id == root.trace_id for s in spans) >= spans_expected

    spans = sink.wait_for(done)
    root = server_span(spans, request_id)
    assert root is not None
    return root, [s for s in spans if s.trace_id == root.trace_id]


def test_a_streamed_fallback_is_one_trace(gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream,
                                          fake_b: FakeUpstream, sink: OtlpSink) -> None:
    gw = gateway_factory(traced_config(fake.url, fake_b.url, sink))
    fake.control(ttft_ms=3000)  # slower than slow-a's first-token timeout: the stream falls back to m1
    r = chat(gw, True, "tr-stream")
    assert r.status_code == 200 and r.headers["x-gateway-fallback-reason"] == "first_token_timeout"
    assert r.text.rstrip().endswith("data: [DONE]")
    rec = gw.record("tr-stream")
    # server span + admission + 2 attempts + stream (no cache span: temperature 0.5 is not cached)
    root, spans = whole_trace(sink, "tr-stream", 5)
    assert root.parent_span_id == "" and root.name == "chat assistant" and root.service == "gw-test"
    by_name: dict[str, list[SpanData]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert "gateway.cache" not in by_name
    for stage in ("gateway.admit", "gateway.stream"):
        assert [s.parent_span_id for s in by_name[stage]] == [root.span_id], stage
        assert root.start_ns <= by_name[stage][0].start_ns <= by_name[stage][0].end_ns <= root.end_ns
    attempts = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_ns)
    assert [a.attributes["gateway.deployment"] for a in attempts] == ["slow-a", "m1-a"]
    assert all(a.parent_span_id == root.span_id and a.name == "chat m1" for a in attempts)
    first, second = attempts
    assert first.attributes["gateway.attempt.outcome"] == "first_token_timeout" and first.status_code == ERROR
    assert first.attributes["error.type"] == "first_token_timeout"
    assert (first.end_ns - first.start_ns) / 1e9 == pytest.approx(0.5, abs=0.4)
    assert second.attributes["gateway.attempt.outcome"] == "ok" and second.status_code != ERROR
    assert second.attributes["server.address"] == "127.0.0.1"
    assert second.attributes["server.port"] == int(fake_b.url.rsplit(":", 1)[1])
    assert first.end_ns <= second.start_ns
    # the answering attempt lasts until the upstream stream ended: past the relay's start
    assert second.start_ns < by_name["gateway.stream"][0].start_ns < second.end_ns <= root.end_ns
    # vLLM (here the test upstream) was told that the second attempt is its parent
    assert sampled(fake_b.counters()["last_traceparent"]) == f"00-{root.trace_id}-{second.span_id}"
    # the fallback decision is an event on the server span
    assert ("gateway.fallback", {"gateway.deployment": "slow-a", "gateway.attempt.outcome": "first_token_timeout"}) \
        in root.events
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "assistant"
    assert a["gen_ai.response.model"] == "m1" and a["gateway.served_model"] == "m1"
    assert a["gen_ai.request.stream"] is True and a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.request.temperature"] == 0.5
    # token counts and money equal the record's
    assert a["gen_ai.usage.input_tokens"] == rec["prompt_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == rec["completion_tokens"] == 5
    assert a["gen_ai.usage.cache_read.input_tokens"] == rec["cached_tokens"]
    assert a["gateway.cost_pico_usd"] == rec["cost_pico_usd"] > 0
    assert second.attributes["gen_ai.usage.output_tokens"] == 5
    assert a["gateway.tenant"] == "anonymous" and a["gateway.outcome"] == "ok"
    assert a["gateway.rule"] == "failure_fallback" and a["gateway.attempts"] == 2
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    assert a["http.request.method"] == "POST" and a["url.path"] == "/v1/chat/completions"
    # never the prompt or the completion
    for s in sink.spans:
        text = repr((s.attributes, s.events, s.name))
        assert "zebra-42" not in text and "secret project" not in text


def test_client_traceparent_is_continued_and_a_malformed_one_ignored(
        gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream, fake_b: FakeUpstream,
        sink: OtlpSink) -> None:
    gw = gateway_factory(traced_config(fake.url, fake_b.url, sink))
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = chat(gw, False, "tr-cont", 0.0, traceparent=f"00-{trace_id}-{parent}-01", tracestate="vendor=abc")
    assert r.status_code == 200
    sent = fake.counters()["last_traceparent"]
    for bad in ("00-zzz-00f067aa0ba902b7-01", f"00-{'0' * 32}-{parent}-01", f"00-{trace_id}-{'0' * 16}-01",
                f"ff-{trace_id}-{parent}-01", "garbage"):
        r = chat(gw, False, f"tr-bad-{bad[:2]}{len(bad)}", traceparent=bad)
        assert r.status_code == 200, (bad, r.text)
    root, spans = whole_trace(sink, "tr-cont", 4)  # server, admission, cache lookup (a miss), attempt
    (cache,) = [s for s in spans if s.name == "gateway.cache"]
    assert cache.attributes["gateway.cache"] == "miss" and cache.parent_span_id == root.span_id
    assert root.trace_id == trace_id and root.parent_span_id == parent
    (attempt,) = [s for s in spans if s.kind == CLIENT]
    assert attempt.attributes["gateway.deployment"] == "slow-a" and attempt.attributes["gateway.attempt"] == 1
    assert sampled(sent) == f"00-{trace_id}-{attempt.span_id}"
    assert root.attributes["gen_ai.request.stream"] is False
    assert root.attributes["gen_ai.usage.output_tokens"] == gw.record("tr-cont")["completion_tokens"]
    # each malformed traceparent started a trace of its own
    roots = sink.wait_for(lambda spans: sum(s.kind == SERVER for s in spans) == 6)
    bad_roots = [s for s in roots if s.kind == SERVER and s.attributes["gateway.request_id"].startswith("tr-bad")]
    assert len(bad_roots) == 5
    assert all(s.parent_span_id == "" and s.trace_id != trace_id for s in bad_roots)
    assert len({s.trace_id for s in bad_roots}) == 5


def test_unsampled_client_trace_is_not_recorded_but_propagated(
        gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream, fake_b: FakeUpstream,
        sink: OtlpSink) -> None:
    gw = gateway_factory(traced_config(fake.url, fake_b.url, sink, sample_ratio=1.0))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    r = chat(gw, False, "tr-unsampled", traceparent=f"00-{trace_id}-b7ad6b7169203331-00")
    assert r.status_code == 200
    tp = fake.counters()["last_traceparent"]
    assert re.fullmatch(f"00-{trace_id}-[0-9a-f]{{16}}-0[02]", tp)  # not sampled: vLLM records nothing either
    chat(gw, False, "tr-after")  # a sampled one after it: once it arrives, the unsampled one would have too
    whole_trace(sink, "tr-after", 3)
    assert sink.trace(trace_id) == []


def test_latency_histograms_carry_the_trace_id_as_exemplar(
        gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream, fake_b: FakeUpstream,
        sink: OtlpSink) -> None:
    gw = gateway_factory(traced_config(fake.url, fake_b.url, sink))
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    assert chat(gw, False, "tr-ex", traceparent=f"00-{trace_id}-00f067aa0ba902b7-01").status_code == 200
    om = httpx.get(gw.url + "/metrics", timeout=5,
                   headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    for name in ("gateway_request_duration_seconds", "gateway_overhead_seconds", "gateway_queue_seconds"):
        assert re.search(rf'^{name}_bucket\{{.*\}} 1\.0 # \{{trace_id="{trace_id}"\}} [0-9.e-]+', om.text, re.M), name
    plain = httpx.get(gw.url + "/metrics", timeout=5)
    assert plain.headers["content-type"].startswith("text/plain") and trace_id not in plain.text


def test_semconv_names_are_in_the_registry() -> None:
    """Every gen_ai.* / server.* / http.* / url.* / error.* attribute the spans use is one the OpenTelemetry
    semantic conventions define (opentelemetry-semantic-conventions ships the registry as constants)."""
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
    from opentelemetry.semconv.attributes import error_attributes, http_attributes, server_attributes, url_attributes

    registry = {v for mod in (gen_ai_attributes, error_attributes, http_attributes, server_attributes,
                              url_attributes) for k, v in vars(mod).items() if k.isupper() and isinstance(v, str)}
    assert set(REQUEST_PARAMS.values()) <= set(SEMCONV_NAMES)
    assert [n for n in SEMCONV_NAMES if n not in registry] == []
    # and the gateway's own attributes keep to their namespace
    source = (ROOT / "gateway" / "tracing.py").read_text()
    used = set(re.findall(r'"((?:gen_ai|server|error|http|url)\.[a-z_.]+)"', source))
    assert used <= set(SEMCONV_NAMES), used - set(SEMCONV_NAMES)


def test_tracing_is_off_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    base = "models: {m: {deployments: [{url: 'http://127.0.0.1:9', model: m}]}}\n"
    assert build_tracing(parse_config(base, "t.yaml")) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    on = build_tracing(parse_config(base, "t.yaml"))
    assert on is not None
    on.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert build_tracing(parse_config(base + "tracing: {otlp_endpoint: 'http://127.0.0.1:9'}\n", "t.yaml")) is None
    with pytest.raises(ConfigError, match="tracing.otlp_endpoint"):
        parse_config(base + "tracing: {otlp_endpoint: 'collector:4318'}\n", "t.yaml")
    with pytest.raises(ConfigError, match="tracing.sample_ratio"):
        parse_config(base + "tracing: {otlp_endpoint: 'http://c:4318', sample_ratio: 1.5}\n", "t.yaml")
    # Off, a worker loads neither the SDK's tracer nor the exporter (redis-py imports parts of the API itself).
    code = ("import sys; from gateway.config import parse_config; from gateway.pipeline import Gateway; "
            f"g = Gateway(parse_config({base!r}, 't.yaml')); assert g.tracing is None; "
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
            "'opentelemetry.exporter', 'opentelemetry.trace.propagation.tracecontext'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

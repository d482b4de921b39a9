"""Acceptance of traces against the real vLLM CPU engine: a streamed request whose first deployment times out
(a black-hole TCP listener: it accepts connections and never answers) falls back to vLLM, and the OTLP receiver
holds one trace with the gateway's server span, both attempt spans, and vLLM's own `llm_request` span as the
child of the second attempt, its token counts equal to the record's.

vLLM is started privately here with --otlp-traces-endpoint (the shared engines run without tracing).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from loadtests.otlp_sink import OtlpSink, SpanData
from tests.conftest import GatewayProcess, free_port
from tests.vllm_fixtures import engines

pytestmark = pytest.mark.vllm
SERVER, CLIENT = 2, 3


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    s = OtlpSink()
    yield s
    s.close()


@pytest.fixture(scope="module")
def traced_vllm(sink: OtlpSink) -> Iterator[str]:
    """A private chat engine (no LoRA: lighter) exporting its spans to the receiver."""
    engines.ensure_ready(verbose=False)
    port = free_port()
    proc = engines.start_chat_engine(port, lora=False, otlp_traces_endpoint=f"{sink.url}/v1/traces")
    url = f"http://127.0.0.1:{port}"
    try:
        engines.wait_healthy(url, timeout=900, proc=proc)
        yield url
    finally:
        engines.stop(proc)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A server that accepts every connection, reads nothing and never answers (the gateway's health checks
    connect too, so it accepts rather than letting its backlog fill)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed at teardown
            while True:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(5)
    for conn in held:
        conn.close()


def config(hole_url: str, vllm_url: str, sink: OtlpSink) -> dict[str, Any]:
    return {
        "models": {
            "smollm2-hole": {"prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2},
                             "deployments": [{"name": "hole-a", "url": hole_url, "model": "smollm2",
                                              "timeouts": {"connect": 2, "first_token": 1.5, "total": 10}}]},
            "smollm2": {"prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2},
                        "deployments": [{"name": "smollm2-a", "url": vllm_url, "model": "smollm2",
                                         "timeouts": {"connect": 2, "first_token": 120, "total": 240}}]},
        },
        "routes": {"assistant": {"candidates": ["smollm2-hole", "smollm2"],
                                 "failure_fallback": {"max_attempts": 2, "budget_s": 60}}},
        "tracing": {"otlp_endpoint": sink.url, "schedule_delay_ms": 200},
    }


def test_streamed_fallback_joins_vllms_span(gateway_factory: Callable[..., GatewayProcess],
                                            traced_vllm: str, black_hole: str, sink: OtlpSink) -> None:
    gw = gateway_factory(config(black_hole, traced_vllm, sink))
    body = {"model": "assistant", "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", content=orjson.dumps(body), timeout=300,
                      headers={"Content-Type": "application/json", "X-Request-Id": "trace-vllm-1"}) as r:
        text = r.read().decode()
    assert r.status_code == 200, text
    assert r.headers["x-gateway-fallback-reason"] == "first_token_timeout"
    assert text.rstrip().endswith("data: [DONE]")
    rec = gw.record("trace-vllm-1")
    assert [a["outcome"] for a in rec["attempts"]] == ["first_token_timeout", "ok"]
    assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] > 0

    def root_of(spans: list[SpanData]) -> SpanData | None:
        return next((s for s in spans if s.kind == SERVER and s.service != "vllm"
                     and s.attributes.get("gateway.request_id") == "trace-vllm-1"), None)

    def complete(spans: list[SpanData]) -> bool:
        root = root_of(spans)
        return root is not None and any(s.name == "llm_request" and s.trace_id == root.trace_id for s in spans)

    spans = sink.wait_for(complete, timeout=60)
    root = root_of(spans)
    assert root is not None and root.parent_span_id == ""
    trace = [s for s in spans if s.trace_id == root.trace_id]
    attempts = sorted((s for s in trace if s.kind == CLIENT), key=lambda s: s.start_ns)
    assert [a.attributes["gateway.deployment"] for a in attempts] == ["hole-a", "smollm2-a"]
    assert [a.attributes["gateway.attempt.outcome"] for a in attempts] == ["first_token_timeout", "ok"]
    assert all(a.parent_span_id == root.span_id for a in attempts)
    (llm,) = [s for s in trace if s.name == "llm_request"]
    assert llm.service == "vllm" and llm.parent_span_id == attempts[1].span_id
    # vLLM's own counts (its span) == the gateway's record == the gateway's spans
    assert llm.attributes["gen_ai.usage.prompt_tokens"] == rec["prompt_tokens"]
    assert llm.attributes["gen_ai.usage.completion_tokens"] == rec["completion_tokens"]
    assert root.attributes["gen_ai.usage.input_tokens"] == rec["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == rec["completion_tokens"]
    assert attempts[1].attributes["gen_ai.usage.output_tokens"] == rec["completion_tokens"]
    assert root.attributes["gateway.cost_pico_usd"] == rec["cost_pico_usd"]
    # vLLM's span lies within the attempt that carried it (one clock: the same machine)
    slack = 50_000_000  # 50 ms
    assert attempts[1].start_ns - slack <= llm.start_ns and llm.end_ns <= attempts[1].end_ns + slack
    # vLLM's timings are there for the operator: queue, prefill, decode
    assert {"gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token"} <= set(llm.attributes)
    # the trace holds nothing but this request: the gateway's spans and vLLM's one
    assert {s.service for s in trace} == {"vllm-gateway", "vllm"}

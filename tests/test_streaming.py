"""Streams are relayed as vLLM produces them, and a client that leaves stops vLLM's work."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from tests.conftest import API_KEY, FakeUpstream, GatewayProcess, metric_value, simple_config

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def test_client_sees_the_upstream_chunk_timing(gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(itl_ms=120)
    arrivals: list[float] = []
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"tok' in line:
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) == 5
    # Buffering would bunch the chunks together; relayed chunk by chunk, each gap is the upstream's 120 ms.
    assert all(0.09 < g < 0.4 for g in gaps), gaps


def test_disconnect_cancels_upstream_and_is_accounted(gateway: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    reset_upstream.control(itl_ms=40)
    before = reset_upstream.counters()["generation_tokens"]
    body = {"model": "m1", "messages": [{"role": "user", "content": "count"}], "max_tokens": 200, "stream": True}
    seen = 0
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={**HEADERS, "X-Request-Id": "leaves-early"}) as r:
        for line in r.iter_lines():
            if '"content":"tok' in line:
                seen += 1
                if seen == 5:
                    break  # closing the response drops the connection
    rec = gateway.record("leaves-early")
    assert rec["outcome"] == "client_left_midstream" and rec["status"] == 499
    assert rec["usage_reported"] is True
    assert 5 <= rec["completion_tokens"] <= 8
    time.sleep(0.5)
    generated = reset_upstream.counters()["generation_tokens"] - before
    assert generated < 20, f"upstream kept generating after the client left: {generated} tokens"
    assert rec["cost_usd"] == pytest.approx((rec["prompt_tokens"] * 1.0 + rec["completion_tokens"] * 2.0) / 1e6)


def test_two_workers_report_one_set_of_metrics(gateway_factory: Callable[..., GatewayProcess],
                                               upstream: FakeUpstream) -> None:
    gw = gateway_factory(simple_config(upstream.url), workers=2)
    body = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 3})
    n = 40
    with httpx.Client(timeout=10) as c:  # new connections spread over both workers
        for _ in range(n):
            assert c.post(gw.url + "/v1/chat/completions", content=body,
                          headers={"Connection": "close"}).status_code == 200
    text = gw.metrics()
    assert metric_value(text, "gateway_requests_total", model="m1", status="200") == n
    assert metric_value(text, "gateway_prompt_tokens_total", model="m1") == n * (2 + 4 + 2)
    assert metric_value(text, "gateway_completion_tokens_total", model="m1") == n * 3
    assert metric_value(text, "gateway_request_duration_seconds_count", model="m1") == n

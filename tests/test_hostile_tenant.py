"""Budget and limit holes a hostile tenant tried on the Responses API and on fallback routes (test upstream).

Each test is one hole from the endpoint-contract issue; each failed before its fix:
- stored conversations were free context: a continuation reserved only its new input, vLLM prefilled the
  whole stored conversation (40 continuations of a 1,000-token response spent 10x a budget);
- a route [cheap (down), pricey] reserved at the cheap model's price and billed the pricey one;
- GET /v1/responses/{id} and /cancel bypassed the pipeline: no rate limit, x-api-key ignored, two
  credentials resolved to the last one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, KEYS, OTHER_KEY, FakeUpstream, GatewayProcess, free_port, start_gateway

A = {"Authorization": f"Bearer {API_KEY}"}


def _gateway(tmp: Path, cfg: dict[str, Any]) -> GatewayProcess:
    return start_gateway(tmp, {"auth": {"keys": KEYS}, "cache": {"mode": "off"}, **cfg})


@pytest.fixture
def gw_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[GatewayProcess] = []

    def make(cfg: dict[str, Any]) -> GatewayProcess:
        g = _gateway(tmp_path, cfg)
        made.append(g)
        return g

    yield make
    for g in made:
        g.proc.terminate()
        g.proc.wait(10)


def _burst(n: int, call: Any) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: call(), range(n)))


def _spent(g: GatewayProcess, tenant: str = "team-a") -> tuple[float, list[dict[str, Any]]]:
    recs = [r for r in g.records() if r["tenant"] == tenant]
    return sum(r["cost_usd"] for r in recs), recs


def test_continuations_reserve_the_stored_conversation(gw_factory: Any, reset_upstream: FakeUpstream) -> None:
    budget = 0.012  # the first answer (~$0.001, reserved at its byte bound ~$0.005) and ~9 continuations
    g = gw_factory({"models": {"m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                                      "deployments": [{"name": "m1-a", "url": reset_upstream.url, "model": "m1"}]}},
                    "tenants": {"team-a": {"limits": {"budget_day_usd": budget}}}})
    first = httpx.post(g.url + "/v1/responses", headers=A, timeout=30, json={
        "model": "m1", "input": "word " * 1000, "max_output_tokens": 6}).json()
    assert first["usage"]["input_tokens"] >= 1000
    reset_upstream.control(ttft_ms=2000)  # nobody settles before every continuation was admitted or refused
    try:
        results = _burst(40, lambda: httpx.post(g.url + "/v1/responses", headers=A, timeout=60, json={
            "model": "m1", "input": "go", "previous_response_id": first["id"], "max_output_tokens": 6}))
    finally:
        reset_upstream.control(ttft_ms=0)
    ok = [r for r in results if r.status_code == 200]
    assert ok and len(ok) < 40 and all(r.status_code in (200, 429) for r in results)
    spent, recs = _spent(g)
    one = max(r["cost_usd"] for r in recs)
    assert spent <= budget + one, f"spent {spent} of a {budget} budget"


def test_fallback_routes_reserve_at_the_dearest_candidates_price(gw_factory: Any,
                                                                 reset_upstream: FakeUpstream) -> None:
    budget = 0.01
    dead = f"http://127.0.0.1:{free_port()}"
    g = gw_factory({
        "models": {"cheap": {"prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.1},
                             "deployments": [{"name": "cheap-a", "url": dead, "model": "m1",
                                              "timeouts": {"connect": 0.5}}]},
                   "pricey": {"prices": {"prompt_per_1m": 10.0, "completion_per_1m": 20.0},
                              "deployments": [{"name": "pricey-a", "url": reset_upstream.url, "model": "m1"}]}},
        "routes": {"assistant": {"candidates": ["cheap", "pricey"]}},
        "circuit_breaker": {"failures": 1000, "min_requests": 1000},
        "tenants": {"team-a": {"limits": {"budget_day_usd": budget}}}})
    reset_upstream.control(ttft_ms=2000)
    try:
        results = _burst(40, lambda: httpx.post(g.url + "/v1/chat/completions", headers=A, timeout=60, json={
            "model": "assistant", "max_tokens": 50, "messages": [{"role": "user", "content": "word " * 20}]}))
    finally:
        reset_upstream.control(ttft_ms=0)
    served = [r for r in results if r.status_code == 200]
    assert served and all(r.headers["x-gateway-model"] == "pricey" for r in served)
    spent, recs = _spent(g)
    one = max(r["cost_usd"] for r in recs)
    assert spent <= budget + one, f"spent {spent} of a {budget} budget"


def test_retrieve_and_cancel_run_through_the_pipeline(gw_factory: Any, reset_upstream: FakeUpstream) -> None:
    g = gw_factory({"models": {"m1": {"deployments": [{"name": "m1-a", "url": reset_upstream.url, "model": "m1"}]}},
                    "tenants": {"team-a": {"limits": {"rpm": 4}}}})
    made = httpx.post(g.url + "/v1/responses", headers=A, timeout=30,
                      json={"model": "m1", "input": "hello", "max_output_tokens": 4}).json()
    path = f"/v1/responses/{made['id']}"
    # the anthropic-style key header authenticates here too
    assert httpx.get(g.url + path, headers={"x-api-key": API_KEY}, timeout=10).status_code == 200
    # duplicate credentials of any kind: a 400 naming the header, never the last one silently
    for headers in ([("authorization", f"Bearer {OTHER_KEY}"), ("authorization", f"Bearer {API_KEY}")],
                    [("x-api-key", OTHER_KEY), ("x-api-key", API_KEY)],
                    [("authorization", f"Bearer {OTHER_KEY}"), ("x-api-key", API_KEY)]):
        r = httpx.get(g.url + path, headers=headers, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] in ("duplicate_header", "duplicate_credentials")
        r = httpx.post(g.url + "/v1/responses", headers=headers, timeout=10, json={"model": "m1", "input": "x"})
        assert r.status_code == 400
    # rate-limited like every request: 50 GETs against an rpm of 4 (2 used above)
    codes = [httpx.get(g.url + path, headers=A, timeout=10).status_code for _ in range(50)]
    assert codes.count(200) == 2 and codes.count(429) == 48
    recs = [r for r in g.records() if r["endpoint"] == "responses.retrieve"]
    assert len(recs) >= 51 and {r["status"] for r in recs} >= {200, 429}

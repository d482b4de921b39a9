"""Routing and fallback rules, each against real HTTP test upstreams with injected faults."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from gateway.config import CircuitBreakerSpec, parse_config
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.routing.live import LiveStats
from gateway.routing.policy import Planner
from tests.conftest import FakeUpstream, GatewayProcess, free_port, metric_value, start_fake_upstream

NORMAL = dict(ttft_ms=0, itl_ms=0, fail_status=0, die_after_chunks=-1, malformed_after_chunks=-1,
              omit_usage=False, error_event_after_chunks=-1, healthy=True, num_waiting=0, kv_cache_usage=0)


@pytest.fixture(scope="module")
def big() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["big-base"])
    yield fake
    fake.kill()


@pytest.fixture(scope="module")
def small() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["small-base", "nlu-adapter"], "--max-model-len", "4096")
    yield fake
    fake.kill()


@pytest.fixture(autouse=True)
def normal(big: FakeUpstream, small: FakeUpstream) -> Iterator[None]:
    for f in (big, small):
        f.control(**NORMAL, reset_counters=True)
    yield
    for f in (big, small):
        f.control(**NORMAL)


def route_config(big_url: str, small_url: str, **route: Any) -> dict[str, Any]:
    return {
        "models": {
            "big": {"prices": {"prompt_per_1m": 10, "completion_per_1m": 30}, "tier": "large",
                    "deployments": [{"name": "big-0", "url": big_url, "model": "big-base",
                                     "timeouts": {"connect": 1, "first_token": 0.5, "total": 5}}]},
            "small": {"prices": {"prompt_per_1m": 1, "completion_per_1m": 2}, "tier": "small",
                      "deployments": [{"name": "small-0", "url": small_url, "model": "small-base"}]},
            "nlu": {"prices": {"prompt_per_1m": 0.5, "completion_per_1m": 1}, "tier": "adapter",
                    "deployments": [{"name": "nlu-0", "url": small_url, "model": "nlu-adapter"}]},
        },
        "routes": {"assistant": {"candidates": ["big", "small", "nlu"], "tasks": {"classification": "nlu"},
                                 **route}},
        "circuit_breaker": {"failures": 2, "cooldown_s": 1.0, "half_open_probes": 1},
        "metrics_scrape_interval": 0.2,
    }


def chat(gw: GatewayProcess, stream: bool = False, max_tokens: int = 4, content: str = "hello there",
         **headers: str) -> httpx.Response:
    body = {"model": "assistant", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}
    return httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps(body), timeout=20,
                      headers={"Content-Type": "application/json", **headers})


def test_failure_fallback_to_the_next_candidate(gateway_factory: Callable[..., GatewayProcess],
                                                big: FakeUpstream, small: FakeUpstream) -> None:
    gw = gateway_factory(route_config(big.url, small.url))
    big.control(fail_status=503)
    r = chat(gw, **{"X-Request-Id": "fb-1"})
    assert r.status_code == 200, r.text
    h = r.headers
    assert h["x-gateway-model"] == "small" and h["x-gateway-rule"] == "failure_fallback"
    assert h["x-gateway-fallback-reason"] == "upstream_503"
    assert h["x-gateway-route"] == "assistant -> small"
    # billed at small's prices, the counterfactual at big's
    tokens_in, tokens_out = int(h["x-gateway-prompt-tokens"]), int(h["x-gateway-completion-tokens"])
    assert float(h["x-gateway-cost-usd"]) == pytest.approx((tokens_in * 1 + tokens_out * 2) / 1e6)
    assert float(h["x-gateway-counterfactual-cost-usd"]) == pytest.approx((tokens_in * 10 + tokens_out * 30) / 1e6)
    rec = gw.record("fb-1")
    assert [a["outcome"] for a in rec["attempts"]] == ["upstream_503", "ok"]
    m = gw.metrics()
    assert metric_value(m, "gateway_fallbacks_total", from_model="big", to_model="small",
                        reason="failure_fallback") == 1


def test_connection_refused_and_first_token_timeout_fall_back(
        gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream, small: FakeUpstream) -> None:
    gw = gateway_factory(route_config(f"http://127.0.0.1:{free_port()}", small.url))
    r = chat(gw, stream=True)
    assert r.status_code == 200 and r.headers["x-gateway-fallback-reason"] == "connect_error"
    assert r.text.rstrip().endswith("data: [DONE]")

    gw2 = gateway_factory(route_config(big.url, small.url))
    big.control(ttft_ms=3000)  # slower than big's first_token timeout of 0.5 s
    t0 = time.monotonic()
    r = chat(gw2, stream=True)
    assert r.status_code == 200 and r.headers["x-gateway-fallback-reason"] == "first_token_timeout"
    assert r.headers["x-gateway-model"] == "small"
    assert time.monotonic() - t0 < 2.5


def test_attempts_are_bounded(gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream,
                              small: FakeUpstream) -> None:
    gw = gateway_factory(route_config(big.url, small.url, failure_fallback={"max_attempts": 1}))
    big.control(fail_status=500)
    r = chat(gw)
    assert r.status_code == 502
    assert small.counters()["requests"] == 0


def test_a_started_stream_is_never_repeated(gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream,
                                            small: FakeUpstream) -> None:
    gw = gateway_factory(route_config(big.url, small.url))
    big.control(die_after_chunks=2)
    r = chat(gw, stream=True, max_tokens=8, **{"X-Request-Id": "no-repeat"})
    events = [e for e in r.text.split("\n\n") if e.startswith("data:")]
    assert orjson.loads(events[-2][5:])["error"]["code"] == "upstream_stream_broken"
    assert '"finish_reason":"stop"' not in r.text and '"finish_reason":"length"' not in r.text
    assert small.counters()["requests"] == 0, "a stream that reached the client must not be re-sent"
    rec = gw.record("no-repeat")
    assert rec["outcome"] == "upstream_failed_midstream" and rec["completion_tokens"] == 2


def test_breaker_unit_open_half_open_close() -> None:
    now = [0.0]
    changes: list[BreakerState] = []
    b = CircuitBreaker("d", CircuitBreakerSpec(failures=3, window_s=10, failure_ratio=0.5, min_requests=4,
                                               cooldown_s=5, half_open_probes=1),
                       on_change=lambda _n, s: changes.append(s), clock=lambda: now[0])
    for _ in range(2):
        b.record(False)
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record(False)
    assert b.state is BreakerState.OPEN and not b.allow()
    now[0] = 5.1
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow(), "only one probe while half-open"
    b.record(False)
    assert b.state is BreakerState.OPEN
    now[0] = 10.3
    assert b.allow()
    b.record(True)
    assert b.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.HALF_OPEN,
                       BreakerState.CLOSED]
    # ratio: 2 failures among 4 requests (not consecutive) also opens
    for ok in (True, False, True, False):
        b.record(ok)
    assert b.state is BreakerState.OPEN


def test_breaker_opens_skips_and_recovers(gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream,
                                          small: FakeUpstream) -> None:
    cfg = route_config(big.url, small.url)
    cfg["circuit_breaker"]["cooldown_s"] = 3.0  # long enough that a loaded machine can't half-open it early
    gw = gateway_factory(cfg)
    big.control(fail_status=500)
    for _ in range(2):
        assert chat(gw).status_code == 200
    assert metric_value(gw.metrics(), "gateway_circuit_breaker_state", deployment="big-0") == 2
    sent = big.counters()["requests"]
    r = chat(gw, **{"X-Request-Id": "skips"})
    assert r.status_code == 200 and big.counters()["requests"] == sent, "open breaker: big not called"
    assert gw.record("skips")["attempts"][0]["outcome"] == "circuit_open"
    big.control(fail_status=0)
    time.sleep(3.1)  # cool-down: the next request is a half-open probe that succeeds
    r = chat(gw)
    assert r.headers["x-gateway-model"] == "big"
    assert metric_value(gw.metrics(), "gateway_circuit_breaker_state", deployment="big-0") == 0


def test_overload_moves_new_requests_to_the_smaller_model(
        gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream, small: FakeUpstream) -> None:
    gw = gateway_factory(route_config(big.url, small.url, overload={"max_waiting": 4, "max_kv_cache": 0.9}))
    assert chat(gw).headers["x-gateway-model"] == "big"
    big.control(num_waiting=12)
    time.sleep(0.6)  # a few scrape intervals
    r = chat(gw, **{"X-Request-Id": "overloaded"})
    assert r.headers["x-gateway-model"] == "small" and r.headers["x-gateway-rule"] == "overload"
    assert "12 waiting" in r.headers["x-gateway-fallback-reason"]
    big.control(num_waiting=0, kv_cache_usage=0.95)
    time.sleep(0.6)
    assert "KV cache" in chat(gw).headers["x-gateway-fallback-reason"]
    big.control(kv_cache_usage=0.1)
    time.sleep(0.6)
    assert chat(gw).headers["x-gateway-model"] == "big"


def test_deadline_only_the_small_model_can_meet(gateway_factory: Callable[..., GatewayProcess],
                                                big: FakeUpstream, small: FakeUpstream) -> None:
    cfg = route_config(big.url, small.url, deadline={"on_miss": "reject"})
    cfg["routes"]["assistant"].update(candidates=["big", "small"], tasks={})
    gw = gateway_factory(cfg)
    big.control(ttft_ms=300, itl_ms=20)
    small.control(ttft_ms=10, itl_ms=2)
    # learn live figures on both (direct model names bypass the route)
    for model in ("big", "small"):
        for _ in range(3):
            httpx.post(gw.url + "/v1/chat/completions", json={"model": model, "stream": True, "max_tokens": 5,
                                                              "messages": [{"role": "user", "content": "x"}]},
                       timeout=20)
    r = chat(gw, max_tokens=10, **{"x-gateway-deadline-ms": "200", "X-Request-Id": "dl"})
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "small"
    assert r.headers["x-gateway-rule"] == "deadline"
    rec = gw.record("dl")
    assert rec["deadline_ms"] == 200 and rec["predicted_ms"] < 200
    assert chat(gw, max_tokens=10, **{"x-gateway-deadline-ms": "2000"}).headers["x-gateway-model"] == "big"
    r = chat(gw, max_tokens=10, **{"x-gateway-deadline-ms": "1"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_unmeetable"
    assert chat(gw, **{"x-gateway-deadline-ms": "soon"}).status_code == 400


def test_context_length_goes_to_a_candidate_whose_window_fits(
        gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream, small: FakeUpstream) -> None:
    cfg = route_config(big.url, small.url)  # big: 2048 tokens (from its /v1/models), small: 4096
    gw = gateway_factory(cfg)
    time.sleep(0.5)  # windows are learnt from /v1/models by the scraper
    long_text = " ".join(["word"] * 3000)
    r = chat(gw, content=long_text, max_tokens=8, **{"X-Request-Id": "ctx"})
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-model"] == "small" and r.headers["x-gateway-rule"] == "context_length"
    r = chat(gw, content=" ".join(["word"] * 5000), max_tokens=8)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "4096" in r.json()["error"]["message"]
    assert chat(gw, content="short").headers["x-gateway-model"] == "big"


def test_task_routing_to_the_adapter(gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream,
                                     small: FakeUpstream) -> None:
    gw = gateway_factory(route_config(big.url, small.url))
    r = chat(gw, **{"x-gateway-task": "classification"})
    assert r.headers["x-gateway-model"] == "nlu" and r.headers["x-gateway-upstream-model"] == "nlu-adapter"
    assert r.headers["x-gateway-rule"] == "task"
    assert small.counters()["last_request"]["model"] == "nlu-adapter"
    assert chat(gw, **{"x-gateway-task": "generation"}).headers["x-gateway-model"] == "big"
    client = OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "great product!"}], max_tokens=1,
        metadata={"task": "classification"})
    assert raw.headers["x-gateway-model"] == "nlu"
    bad = chat(gw, **{"x-gateway-task": "astrology"})
    assert bad.status_code == 400 and "astrology" in bad.json()["error"]["message"]


def test_lora_affinity_adapter_requests_only_reach_servers_with_the_adapter(
        gateway_factory: Callable[..., GatewayProcess], big: FakeUpstream, small: FakeUpstream) -> None:
    cfg = route_config(big.url, small.url)
    cfg["models"]["nlu"]["deployments"].append({"name": "nlu-1", "url": small.url, "model": "nlu-adapter"})
    gw = gateway_factory(cfg)
    for _ in range(6):
        assert chat(gw, **{"x-gateway-task": "classification"}).headers["x-gateway-deployment"] in {"nlu-0", "nlu-1"}
    assert big.counters()["requests"] == 0


def test_budget_pressure_downgrades_to_the_cheapest_candidate() -> None:
    text = """
models:
  big: {prices: {prompt_per_1m: 10, completion_per_1m: 30}, deployments: [{url: "http://a:1", model: b}]}
  small: {prices: {prompt_per_1m: 1, completion_per_1m: 2}, deployments: [{url: "http://b:1", model: s}]}
routes:
  r: {candidates: [big, small], budget_pressure: {threshold: 0.8}, context_length: false}
"""
    cfg = parse_config(text, "t.yaml", env={})
    spent = {"rich": 0.1, "poor": 0.85}
    breakers = {n: CircuitBreaker(n, cfg.circuit_breaker) for n in ("big-0", "small-0")}
    planner = Planner(cfg, LiveStats(cfg), breakers, budget_fraction=spent.__getitem__, in_flight=lambda _n: 0)

    import asyncio

    async def no_count(_m: Any, _b: Any) -> tuple[int, int]:
        raise AssertionError("not needed")

    rich = asyncio.run(planner.plan("r", {"messages": []}, "rich", None, None, no_count))
    poor = asyncio.run(planner.plan("r", {"messages": []}, "poor", None, None, no_count))
    assert [m.name for m in rich.candidates] == ["big", "small"] and rich.rule is None
    assert [m.name for m in poor.candidates] == ["small", "big"] and poor.rule == "budget_pressure"
    assert "85%" in (poor.reason or "")


def test_context_check_survives_a_dead_deployment(gateway_factory: Callable[..., GatewayProcess],
                                                  big: FakeUpstream, small: FakeUpstream) -> None:
    cfg = route_config(big.url, small.url)
    cfg["models"]["big"]["deployments"].insert(0, {"name": "big-dead", "url": f"http://127.0.0.1:{free_port()}",
                                                   "model": "big-base", "weight": 10})
    gw = gateway_factory(cfg)
    time.sleep(0.5)
    text = " ".join(["word"] * 1500)  # needs counting (over the byte bound) but fits big's 2048 tokens
    r = chat(gw, content=text, max_tokens=8)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-model"] == "big" and r.headers["x-gateway-deployment"] == "big-0"


def test_budget_pressure_keeps_a_task_choice_first() -> None:
    text = """
models:
  big: {prices: {prompt_per_1m: 10, completion_per_1m: 30}, deployments: [{url: "http://a:1", model: b}]}
  tiny: {prices: {prompt_per_1m: 0.1, completion_per_1m: 0.2}, deployments: [{url: "http://c:1", model: t}]}
  nlu: {prices: {prompt_per_1m: 1, completion_per_1m: 2}, deployments: [{url: "http://b:1", model: n}]}
routes:
  r: {candidates: [big, tiny, nlu], tasks: {classification: nlu}, budget_pressure: {threshold: 0.5},
      context_length: false}
"""
    import asyncio

    cfg = parse_config(text, "t.yaml", env={})
    breakers = {n: CircuitBreaker(n, cfg.circuit_breaker) for n in ("big-0", "tiny-0", "nlu-0")}
    planner = Planner(cfg, LiveStats(cfg), breakers, budget_fraction=lambda _t: 0.9, in_flight=lambda _n: 0)
    plan = asyncio.run(planner.plan("r", {"messages": []}, "t", "classification", None, lambda *_: None))
    assert [m.name for m in plan.candidates] == ["nlu", "tiny", "big"] and plan.rule == "task"

"""Rate limits and budgets: two gateway processes sharing one Redis enforce one limit exactly."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.errors import GatewayError
from gateway.limits import StoreLimiter
from gateway.record import RequestRecord
from gateway.reservation import OutputBounds, reserve
from gateway.store import InMemoryStore
from tests.conftest import API_KEY, OTHER_KEY, FakeUpstream, GatewayProcess, metric_value, simple_config
from tests.redis_fixtures import RedisServer, with_redis

A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}


def avoid_minute_boundary() -> None:
    """Limits use one-minute windows: keep a burst inside one."""
    into = time.time() % 60
    if into > 50:
        time.sleep(60.2 - into)


def burst(gws: list[GatewayProcess], body: dict[str, Any], n: int, headers: dict[str, str] = A
          ) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        return httpx.post(gws[i % len(gws)].url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def two_gateways(factory: Callable[..., GatewayProcess], cfg: dict[str, Any], url: str, prefix: str
                 ) -> list[GatewayProcess]:
    c = with_redis(cfg, url, prefix)
    return [factory(c), factory(c)]


def keys_with(limits_a: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    a: dict[str, Any] = {"tenant": "team-a", "key": API_KEY}
    if limits_a:
        a["limits"] = limits_a
    return [a, {"tenant": "team-b", "key": OTHER_KEY}]


def test_rpm_is_exact_across_two_gateways(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                          redis_server: RedisServer, redis_prefix: str) -> None:
    cfg = {**simple_config(upstream.url, keys=keys_with()), "tenants": {"team-a": {"limits": {"rpm": 7}}}}
    gws = two_gateways(gateway_factory, cfg, redis_server.url, redis_prefix)
    # sliding windows: no minute edge to avoid
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    results = burst(gws, body, 24)
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) == 7 and len(refused) == 17
    r = refused[0]
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-limit-requests"] == "7" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    assert sorted(int(x.headers["x-ratelimit-remaining-requests"]) for x in ok) == list(range(7))
    # another tenant is not limited
    assert httpx.post(gws[0].url + "/v1/chat/completions", json=body, headers=B, timeout=10).status_code == 200
    refusals = sum(metric_value(g.metrics(), "gateway_ratelimit_refusals_total", tenant="team-a", limit="rpm")
                   for g in gws)
    assert refusals == 17


def test_tpm_reserves_up_front_and_reconciles(gateway_factory: Callable[..., GatewayProcess],
                                              reset_upstream: FakeUpstream, redis_server: RedisServer,
                                              redis_prefix: str) -> None:
    # 40 characters in one word: the byte bound (no tokenizer configured) is well above vLLM's count (7).
    body = {"model": "m1", "messages": [{"role": "user", "content": "a" * 40}], "max_tokens": 5}
    prompt_est, completion = reserve(dict(body), "chat", OutputBounds(256))
    reserved = prompt_est + completion
    actual = 7 + 5
    assert reserved > actual
    tpm = reserved * 3 + 10
    cfg = {**simple_config(reset_upstream.url, keys=keys_with()), "tenants": {"team-a": {"limits": {"tpm": tpm}}}}
    gws = two_gateways(gateway_factory, cfg, redis_server.url, redis_prefix)
    # sliding windows: no minute edge to avoid
    reset_upstream.control(ttft_ms=3000)  # nobody finishes (and reconciles) before every request was admitted
    results = burst(gws, body, 10)
    assert [r.status_code for r in results].count(200) == 3
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert "tokens per minute" in refused.json()["error"]["message"]
    reset_upstream.control(ttft_ms=0)
    client = redis_server.client()

    def used() -> int:
        return int(client.get(f"{redis_prefix}{{t:team-a}}:rl:t:tt") or 0)

    deadline = time.monotonic() + 5
    while used() != 3 * actual and time.monotonic() < deadline:
        time.sleep(0.05)
    assert used() == 3 * actual  # reconciled to vLLM's real usage
    # what reconciliation gave back admits one more request (3 x 12 + reserved <= 3 x reserved + 10)
    r = httpx.post(gws[1].url + "/v1/chat/completions", json=body, headers=A, timeout=10)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while used() != 4 * actual and time.monotonic() < deadline:
        time.sleep(0.05)
    assert used() == 4 * actual


def test_budgets_are_exact_across_two_gateways(gateway_factory: Callable[..., GatewayProcess],
                                               reset_upstream: FakeUpstream, redis_server: RedisServer,
                                               redis_prefix: str) -> None:
    cfg = simple_config(reset_upstream.url, keys=keys_with())
    cfg["models"]["m1"]["prices"] = {"prompt_per_1m": 0, "completion_per_1m": 1_000_000}  # $1 per token
    cfg["tenants"] = {"team-a": {"limits": {"budget_day_usd": 9}}, "team-b": {"limits": {"budget_month_usd": 3}}}
    gws = two_gateways(gateway_factory, cfg, redis_server.url, redis_prefix)
    body = {"model": "m1", "messages": [{"role": "user", "content": "spend"}], "max_tokens": 2}  # $2 each
    reset_upstream.control(ttft_ms=3000)  # nobody settles before every request was admitted
    results = burst(gws, body, 12)
    reset_upstream.control(ttft_ms=0)
    assert [r.status_code for r in results].count(200) == 4  # 4 x $2 <= $9 < 5 x $2
    refused = next(r for r in results if r.status_code == 429)
    err = refused.json()["error"]
    assert err["code"] == "budget_day_exceeded" and err["type"] == "insufficient_quota"
    assert "Daily budget" in err["message"] and int(refused.headers["retry-after"]) <= 86400
    client = redis_server.client()
    spent = [int(client.get(k)) for k in client.scan_iter(f"{redis_prefix}{{t:team-a}}:rl:t:d:*")]
    assert spent == [8 * 10**12]  # exact integer pico-USD
    b = burst(gws, body, 4, B)
    assert [r.status_code for r in b].count(200) == 1
    assert next(r for r in b if r.status_code == 429).json()["error"]["code"] == "budget_month_exceeded"
    spend_gauge = max(metric_value(g.metrics(), "gateway_tenant_spend_usd", tenant="team-a", period="day")
                      for g in gws)
    assert spend_gauge == 8.0
    assert metric_value(gws[0].metrics(), "gateway_tenant_budget_usd", tenant="team-a", period="day") == 9


def test_per_key_concurrency(gateway_factory: Callable[..., GatewayProcess], reset_upstream: FakeUpstream,
                             redis_server: RedisServer, redis_prefix: str) -> None:
    cfg = simple_config(reset_upstream.url, keys=keys_with({"concurrency": 2}))
    gws = two_gateways(gateway_factory, cfg, redis_server.url, redis_prefix)
    body = {"model": "m1", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 2}
    reset_upstream.control(ttft_ms=3000)
    results = burst(gws, body, 8)
    reset_upstream.control(ttft_ms=0)
    assert [r.status_code for r in results].count(200) == 2
    assert "concurrent" in next(r for r in results if r.status_code == 429).json()["error"]["message"]
    time.sleep(0.3)  # the slots are released at finalize
    assert all(r.status_code == 200 for r in burst(gws, body, 2))


async def test_in_process_limiter_and_budget_fraction() -> None:
    cfg = parse_config("""
models: {m1: {deployments: [{url: "http://127.0.0.1:1", model: m1}], prices: {completion_per_1m: 1000000}}}
tenants: {anonymous: {limits: {rpm: 2, budget_day_usd: 10}}}
""", "test")
    seen: list[tuple[str, str, float]] = []
    lim = StoreLimiter(cfg, InMemoryStore(), lambda t, p, v: seen.append((t, p, v)))
    model = cfg.models["m1"]
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    for i in range(2):
        rec = RequestRecord(f"r{i}", "chat", tenant="anonymous")
        await lim.admit(rec, model, body)
        assert rec.reservation is not None
        rec.usage.completion_tokens, rec.money.cost_pico_usd = 2, 2 * 10**12
        lim.settle(rec)
    await lim.close()
    assert lim.budget_used_fraction("anonymous") == pytest.approx(0.4)
    assert lim.budget_used_fraction("nobody") == 0.0
    with pytest.raises(GatewayError) as e:
        await lim.admit(RequestRecord("r3", "chat", tenant="anonymous"), model, body)
    assert e.value.status == 429 and e.value.headers["x-ratelimit-remaining-requests"] == "0"

"""Response cache against a real Redis: key components, Cache-Control, streaming replay, tenants, stampedes."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, KEYS, OTHER_KEY, FakeUpstream, GatewayProcess, metric_value, simple_config
from tests.redis_fixtures import RedisServer, with_redis

A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, "temperature": 0}


def config(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    cfg = simple_config(upstream.url, keys=KEYS)
    cfg["models"]["m1-adapter"] = {"prices": {"prompt_per_1m": 0.5, "completion_per_1m": 1.0},
                                   "deployments": [{"name": "adapter-a", "url": upstream.url, "model": "m1-adapter"}]}
    return {**cfg, **extra}


@pytest.fixture
def cached_gw(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis_server: RedisServer,
              redis_prefix: str) -> GatewayProcess:
    return gateway_factory(with_redis(config(upstream), redis_server.url, redis_prefix))


def post(gw: GatewayProcess, body: dict[str, Any], headers: dict[str, str] | None = None,
         path: str = "/v1/chat/completions") -> httpx.Response:
    r = httpx.post(gw.url + path, json=body, headers={**A, **(headers or {})}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def upstream_requests(up: FakeUpstream) -> int:
    return int(up.counters()["requests"])


def test_every_key_component_makes_a_miss(cached_gw: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    first = post(cached_gw, CHAT)
    assert first.headers["x-gateway-cache"] == "miss"
    before = upstream_requests(reset_upstream)
    hit = post(cached_gw, CHAT)
    assert hit.headers["x-gateway-cache"] == "hit"
    assert hit.content == first.content
    assert upstream_requests(reset_upstream) == before  # vLLM not called
    # The fields that do not change the answer are not part of the key.
    assert post(cached_gw, {**CHAT, "user": "someone", "stream_options": None}).headers["x-gateway-cache"] == "hit"

    variants: list[tuple[dict[str, Any], dict[str, str], str]] = [
        ({**CHAT, "messages": [{"role": "user", "content": "hello therE"}]}, A, "/v1/chat/completions"),
        ({**CHAT, "messages": [{"role": "system", "content": "hello there"}]}, A, "/v1/chat/completions"),
        ({**CHAT, "max_tokens": 4}, A, "/v1/chat/completions"),
        ({**CHAT, "seed": 7}, A, "/v1/chat/completions"),
        ({**CHAT, "top_p": 0.5}, A, "/v1/chat/completions"),
        ({**CHAT, "stop": ["x"]}, A, "/v1/chat/completions"),
        ({**CHAT, "model": "m1-adapter"}, A, "/v1/chat/completions"),  # the adapter is its own model
        (CHAT, B, "/v1/chat/completions"),  # another tenant
        ({"model": "m1", "prompt": "hello there", "max_tokens": 3, "temperature": 0}, A, "/v1/completions"),
    ]
    for body, headers, path in variants:
        n = upstream_requests(reset_upstream)
        r = httpx.post(cached_gw.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 200
        assert r.headers["x-gateway-cache"] == "miss", body
        assert upstream_requests(reset_upstream) == n + 1
        again = httpx.post(cached_gw.url + path, json=body, headers=headers, timeout=30)
        assert again.headers["x-gateway-cache"] == "hit", body
        assert again.content == r.content


def test_only_deterministic_requests_are_cached(cached_gw: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    sampled = {**CHAT, "temperature": 0.7}
    assert post(cached_gw, sampled).headers["x-gateway-cache"] == "bypass"
    assert post(cached_gw, sampled).headers["x-gateway-cache"] == "bypass"
    no_temp = {k: v for k, v in CHAT.items() if k != "temperature"}
    assert post(cached_gw, no_temp).headers["x-gateway-cache"] == "bypass"
    seeded = {**sampled, "seed": 42}
    assert post(cached_gw, seeded).headers["x-gateway-cache"] == "miss"
    assert post(cached_gw, seeded).headers["x-gateway-cache"] == "hit"
    emb = {"model": "m1", "input": ["a b c"]}
    assert post(cached_gw, emb, path="/v1/embeddings").headers["x-gateway-cache"] == "miss"
    e2 = post(cached_gw, emb, path="/v1/embeddings")
    assert e2.headers["x-gateway-cache"] == "hit" and e2.json()["data"][0]["embedding"]


def test_cache_control_headers(cached_gw: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "cache control"}]}
    # no-store: answered from vLLM, not kept
    assert post(cached_gw, body, {"Cache-Control": "no-store"}).headers["x-gateway-cache"] == "miss"
    assert post(cached_gw, body, {"Cache-Control": "no-store"}).headers["x-gateway-cache"] == "miss"
    # no-cache: skips the lookup but stores
    n = upstream_requests(reset_upstream)
    assert post(cached_gw, body, {"Cache-Control": "no-cache"}).headers["x-gateway-cache"] == "bypass"
    assert upstream_requests(reset_upstream) == n + 1
    assert post(cached_gw, body).headers["x-gateway-cache"] == "hit"
    assert post(cached_gw, body, {"Cache-Control": "no-cache"}).headers["x-gateway-cache"] == "bypass"
    assert upstream_requests(reset_upstream) == n + 2


def test_a_hit_is_accounted_with_cost_zero_and_saved(cached_gw: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "account me please"}]}
    miss = post(cached_gw, body, {"X-Request-Id": "acct-miss"})
    hit = post(cached_gw, body, {"X-Request-Id": "acct-hit"})
    cost = float(miss.headers["x-gateway-cost-usd"])
    assert cost > 0
    assert float(hit.headers["x-gateway-cost-usd"]) == 0
    assert float(hit.headers["x-gateway-saved-usd"]) == pytest.approx(cost)
    assert hit.headers["x-gateway-prompt-tokens"] == miss.headers["x-gateway-prompt-tokens"]
    rec = cached_gw.record("acct-hit")
    assert rec["cache"] == "hit" and rec["cost_usd"] == 0 and rec["saved_usd"] == pytest.approx(cost)
    assert rec["deployment"] is None and rec["e2e_ms"] > 0
    text = cached_gw.metrics()
    assert metric_value(text, "gateway_cache_requests_total", tenant="team-a", result="hit") >= 1
    assert metric_value(text, "gateway_cache_saved_usd_total", tenant="team-a") == pytest.approx(cost)
    assert metric_value(text, "gateway_cache_tokens_total", tenant="team-a", kind="prompt") == rec["prompt_tokens"]


def stream_lines(gw: GatewayProcess, body: dict[str, Any], headers: dict[str, str] | None = None
                 ) -> tuple[httpx.Headers, list[str]]:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={**A, **(headers or {})}, timeout=30) as r:
        assert r.status_code == 200
        return r.headers, [ln for ln in r.iter_lines() if ln.startswith("data:")]


def test_streaming_replay_equals_the_original(cached_gw: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    body = {**CHAT, "max_tokens": 5, "messages": [{"role": "user", "content": "stream me"}],
            "stream_options": {"include_usage": True}}
    h1, original = stream_lines(cached_gw, body)
    n = upstream_requests(reset_upstream)
    h2, replayed = stream_lines(cached_gw, body, {"X-Request-Id": "replay"})
    assert (h1["x-gateway-cache"], h2["x-gateway-cache"]) == ("miss", "hit")
    assert replayed == original and replayed[-1] == "data: [DONE]"
    assert upstream_requests(reset_upstream) == n
    rec = cached_gw.record("replay")
    assert rec["cache"] == "hit" and rec["completion_tokens"] == 5 and rec["ttft_ms"] is not None
    # Without include_usage the same entry is replayed without the usage chunk, as vLLM would stream it.
    _, plain = stream_lines(cached_gw, {**body, "stream_options": None})
    assert plain[-1] == "data: [DONE]" and all('"usage"' not in ln for ln in plain)


def test_a_stream_that_ends_in_error_is_not_stored(cached_gw: GatewayProcess, reset_upstream: FakeUpstream) -> None:
    body = {**CHAT, "max_tokens": 6, "messages": [{"role": "user", "content": "breaks midway"}]}
    reset_upstream.control(error_event_after_chunks=2)
    _, lines = stream_lines(cached_gw, body)
    assert any("error" in ln for ln in lines)
    reset_upstream.control(error_event_after_chunks=-1)
    h, _ = stream_lines(cached_gw, body)
    assert h["x-gateway-cache"] == "miss"
    h, _ = stream_lines(cached_gw, body)
    assert h["x-gateway-cache"] == "hit"


def test_tenants_never_share_unless_a_scope_says_so(gateway_factory: Callable[..., GatewayProcess],
                                                     upstream: FakeUpstream, redis_server: RedisServer,
                                                     redis_prefix: str) -> None:
    isolated = gateway_factory(with_redis(config(upstream), redis_server.url, redis_prefix))
    body = {**CHAT, "messages": [{"role": "user", "content": "private answer"}]}
    assert post(isolated, body).headers["x-gateway-cache"] == "miss"
    assert post(isolated, body, B).headers["x-gateway-cache"] == "miss"
    org = {"cache": {"scope": "org"}}
    shared_cfg = config(upstream, tenants={"team-a": org, "team-b": org})
    shared = gateway_factory(with_redis(shared_cfg, redis_server.url, redis_prefix + "s:"))
    assert post(shared, body).headers["x-gateway-cache"] == "miss"
    assert post(shared, body, B).headers["x-gateway-cache"] == "hit"


def test_per_model_and_tenant_policy(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                     redis_server: RedisServer, redis_prefix: str) -> None:
    cfg = config(upstream, tenants={"team-b": {"cache": {"mode": "off"}}})
    cfg["models"]["m1"]["cache"] = {"mode": "all"}
    gw = gateway_factory(with_redis(cfg, redis_server.url, redis_prefix))
    sampled = {**CHAT, "temperature": 0.9, "messages": [{"role": "user", "content": "policy"}]}
    assert post(gw, sampled).headers["x-gateway-cache"] == "miss"
    assert post(gw, sampled).headers["x-gateway-cache"] == "hit"  # the model caches everything
    assert post(gw, {**sampled, "model": "m1-adapter"}).headers["x-gateway-cache"] == "bypass"
    assert post(gw, CHAT, B).headers["x-gateway-cache"] == "bypass"  # team-b turned it off


def test_a_stampede_reaches_vllm_once(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                      reset_upstream: FakeUpstream, redis_server: RedisServer,
                                      redis_prefix: str) -> None:
    cfg = with_redis(config(upstream), redis_server.url, redis_prefix)
    gws = [gateway_factory(cfg), gateway_factory(cfg)]
    reset_upstream.control(ttft_ms=400)
    body = {**CHAT, "messages": [{"role": "user", "content": "everyone asks this at once"}]}
    n = upstream_requests(reset_upstream)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: post(gws[i % 2], body), range(20)))
    assert upstream_requests(reset_upstream) == n + 1
    assert len({r.content for r in results}) == 1
    kinds = sorted(r.headers["x-gateway-cache"] for r in results)
    assert kinds.count("miss") == 1 and kinds.count("hit") == 19


def test_in_process_backend_without_redis(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                          reset_upstream: FakeUpstream) -> None:
    gw = gateway_factory(config(upstream))
    body = {**CHAT, "messages": [{"role": "user", "content": "no redis here"}]}
    assert post(gw, body).headers["x-gateway-cache"] == "miss"
    assert post(gw, body).headers["x-gateway-cache"] == "hit"
    assert post(gw, body, B).headers["x-gateway-cache"] == "miss"

"""Redis killed and restarted under load: no failed request (fail open), no lost ledger record after recovery."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from tests.conftest import API_KEY, KEYS, FakeUpstream, GatewayProcess, metric_value, simple_config
from tests.redis_fixtures import RedisServer, with_redis

A = {"Authorization": f"Bearer {API_KEY}"}


def ledger_ids(server: RedisServer, prefix: str) -> set[str]:
    return {orjson.loads(f[b"r"])["request_id"] for _, f in server.client().xrange(prefix + "ledger")}


def test_redis_restart_mid_load(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                own_redis: RedisServer) -> None:
    cfg = simple_config(upstream.url, keys=KEYS)
    cfg["tenants"] = {"team-a": {"limits": {"rpm": 100000, "tpm": 10_000_000, "concurrency": 100}}}
    gw = gateway_factory(with_redis(cfg, own_redis.url, "gw:", timeout_s=0.1, down_for_s=0.2))
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            i = 0
            while not stop.is_set():
                body = {"model": "m1", "messages": [{"role": "user", "content": f"q {i % 7}"}], "max_tokens": 2,
                        "temperature": 0}
                results.append(c.post(gw.url + "/v1/chat/completions", json=body, headers=A).status_code)
                i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    own_redis.kill()
    during = len(results)
    time.sleep(1.5)
    during = len(results) - during
    own_redis.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert during > 10, "requests kept being served while Redis was down"
    assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}

    text = gw.metrics()
    assert metric_value(text, "gateway_redis_errors_total") > 0
    deadline = time.monotonic() + 10
    want = {r["request_id"] for r in gw.records()}
    assert len(want) == len(results)
    while ledger_ids(own_redis, "gw:") != want and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ledger_ids(own_redis, "gw:") == want
    assert metric_value(gw.metrics(), "gateway_ledger_buffered") == 0
    assert metric_value(gw.metrics(), "gateway_ledger_dropped_total") == 0


def test_limits_fail_closed_when_configured(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                            own_redis: RedisServer) -> None:
    cfg: dict[str, Any] = simple_config(upstream.url, keys=KEYS)
    cfg["tenants"] = {"team-a": {"limits": {"rpm": 1000}}}
    gw = gateway_factory(with_redis(cfg, own_redis.url, "gw:", on_failure={"limits": "closed"}))
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body, headers=A, timeout=10).status_code == 200
    own_redis.kill()
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=A, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
    # the cache fails open by default: a cacheable request of an unlimited tenant is served
    r = httpx.post(gw.url + "/v1/chat/completions", json={**body, "temperature": 0},
                   headers={"Authorization": f"Bearer {KEYS[1]['key']}"}, timeout=10)
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "bypass"


def test_ledger_buffer_overflow_is_counted(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                           own_redis: RedisServer) -> None:
    # without the spool (tests/test_spool.py), the records wait in memory only
    cfg = {**simple_config(upstream.url, keys=KEYS), "ledger": {"spool_path": "off"}}
    gw = gateway_factory(with_redis(cfg, own_redis.url, "gw:", ledger_buffer=3))
    own_redis.kill()
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "temperature": 0.5}
    for _ in range(7):
        assert httpx.post(gw.url + "/v1/chat/completions", json=body, headers=A, timeout=10).status_code == 200
    text = gw.metrics()
    assert metric_value(text, "gateway_ledger_dropped_total") == 4
    assert metric_value(text, "gateway_ledger_buffered") == 3
    own_redis.start()
    deadline = time.monotonic() + 10
    while len(ledger_ids(own_redis, "gw:")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ledger_ids(own_redis, "gw:")) == 3

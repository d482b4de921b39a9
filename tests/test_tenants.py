"""Tenants kept apart (usage, cache, limits) and secrets kept out of every output, against real Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import ROOT, FakeUpstream, GatewayProcess, simple_config
from tests.redis_fixtures import RedisServer, with_redis
from tests.test_limits import avoid_minute_boundary

KEY_A, KEY_B, KEY_ADMIN = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-admin-secret-555"
KEYS = [{"tenant": "a", "key": KEY_A}, {"tenant": "b", "key": KEY_B}, {"tenant": "ops", "key": KEY_ADMIN,
                                                                       "admin": True}]


def h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def chat(gw: GatewayProcess, key: str, content: str = "hello", **body: Any) -> httpx.Response:
    payload = {"model": "m1", "messages": [{"role": "user", "content": content}], "max_tokens": 3, **body}
    return httpx.post(gw.url + "/v1/chat/completions", json=payload, headers=h(key), timeout=10)


def tenant_gateway(factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis: RedisServer,
                   prefix: str) -> GatewayProcess:
    cfg = with_redis(simple_config(upstream.url, keys=KEYS), redis.url, prefix)
    cfg["tenants"] = {"a": {"limits": {"rpm": 3}}, "b": {"limits": {"rpm": 3}}}
    return factory(cfg)


def test_one_tenant_cannot_exhaust_anothers_limits(gateway_factory: Callable[..., GatewayProcess],
                                                   upstream: FakeUpstream, redis_server: RedisServer,
                                                   redis_prefix: str) -> None:
    avoid_minute_boundary()
    gw = tenant_gateway(gateway_factory, upstream, redis_server, redis_prefix)
    a = [chat(gw, KEY_A).status_code for _ in range(6)]
    assert a.count(200) == 3 and a.count(429) == 3
    assert [chat(gw, KEY_B).status_code for _ in range(3)] == [200, 200, 200]


def test_one_tenant_cannot_hit_anothers_cache(gateway_factory: Callable[..., GatewayProcess],
                                              upstream: FakeUpstream, redis_server: RedisServer,
                                              redis_prefix: str) -> None:
    gw = tenant_gateway(gateway_factory, upstream, redis_server, redis_prefix)
    assert chat(gw, KEY_A, "the same question", temperature=0).headers["x-gateway-cache"] == "miss"
    assert chat(gw, KEY_A, "the same question", temperature=0).headers["x-gateway-cache"] == "hit"
    assert chat(gw, KEY_B, "the same question", temperature=0).headers["x-gateway-cache"] == "miss"


def test_usage_is_private_and_admin_only_sees_all(gateway_factory: Callable[..., GatewayProcess],
                                                  upstream: FakeUpstream, redis_server: RedisServer,
                                                  redis_prefix: str) -> None:
    gw = tenant_gateway(gateway_factory, upstream, redis_server, redis_prefix)
    assert chat(gw, KEY_A).status_code == 200 and chat(gw, KEY_B).status_code == 200

    def usage(key: str, **params: str) -> dict[str, Any]:
        r = httpx.get(gw.url + "/v1/usage", headers=h(key), params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    text_a = orjson.dumps(usage(KEY_A)).decode()
    assert '"a"' in text_a and '"b"' not in text_a
    text_a_asks_b = orjson.dumps(usage(KEY_A, tenant="b")).decode()  # a tenant cannot widen its view
    assert '"b"' not in text_a_asks_b
    text_admin = orjson.dumps(usage(KEY_ADMIN)).decode()
    assert '"a"' in text_admin and '"b"' in text_admin


def test_keys_never_appear_in_logs_metrics_errors_or_ledger(gateway_factory: Callable[..., GatewayProcess],
                                                            upstream: FakeUpstream, redis_server: RedisServer,
                                                            redis_prefix: str, tmp_path: Path) -> None:
    gw = tenant_gateway(gateway_factory, upstream, redis_server, redis_prefix)
    outputs = [chat(gw, KEY_A, "secret prompt text").text, chat(gw, KEY_B, stream=True).text]
    wrong = httpx.post(gw.url + "/v1/chat/completions", headers=h("sk-wrong-key-777"),
                       json={"model": "m1", "messages": [{"role": "user", "content": "x"}]}, timeout=10)
    assert wrong.status_code == 401
    outputs += [wrong.text, str(wrong.headers), gw.metrics(), gw.log_path.read_text()]
    export = tmp_path / "ledger.jsonl"
    subprocess.run([sys.executable, "-m", "gateway", "ledger-export", "--config", str(gw.config_path),
                    "--out", str(export)], cwd=ROOT, check=True, capture_output=True, timeout=60)
    outputs.append(export.read_text())
    everything = "\n".join(outputs)
    for secret in (KEY_A, KEY_B, KEY_ADMIN, "sk-wrong-key-777"):
        assert secret not in everything
    # and prompt text stays out of the log, metrics and ledger (it is only in the upstream's answer)
    assert "secret prompt text" not in "\n".join(outputs[3:])

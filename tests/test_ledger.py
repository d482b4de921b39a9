"""Usage ledger: every record reaches the Redis stream; /v1/usage totals = per-request records = Prometheus."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import API_KEY, KEYS, OTHER_KEY, ROOT, FakeUpstream, GatewayProcess, metric_value, simple_config
from tests.redis_fixtures import RedisServer, with_redis
from tests.test_limits import avoid_minute_boundary

A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}
ADMIN = {"Authorization": "Bearer sk-admin"}


def chat(gw: GatewayProcess, content: str, headers: dict[str, str] = A, **extra: Any) -> httpx.Response:
    body = {"model": "m1", "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0,
            **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def usage(gw: GatewayProcess, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    r = httpx.get(gw.url + "/v1/usage", headers=headers, params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_ledger_totals_equal_records_equal_metrics(gateway_factory: Callable[..., GatewayProcess],
                                                   reset_upstream: FakeUpstream, redis_server: RedisServer,
                                                   redis_prefix: str, tmp_path: Any) -> None:
    cfg = simple_config(reset_upstream.url, keys=[*KEYS, {"tenant": "ops", "key": "sk-admin", "admin": True}])
    cfg["tenants"] = {"team-a": {"limits": {"rpm": 12}}}
    gw = gateway_factory(with_redis(cfg, redis_server.url, redis_prefix))
    avoid_minute_boundary()
    t0 = time.time()
    for i in range(3):
        assert chat(gw, f"distinct {i}").status_code == 200
    assert chat(gw, "distinct 0").headers["x-gateway-cache"] == "hit"
    assert chat(gw, "distinct 1").headers["x-gateway-cache"] == "hit"
    reset_upstream.control(fail_status=500)
    assert chat(gw, "upstream fails").status_code == 502
    reset_upstream.control(fail_status=0, itl_ms=30)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=A, timeout=30,
                      json={"model": "m1", "messages": [{"role": "user", "content": "leave"}], "max_tokens": 100,
                            "stream": True}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 8:
                break
    reset_upstream.control(itl_ms=0)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=A, timeout=30,
                      json={"model": "m1", "messages": [{"role": "user", "content": "full"}], "max_tokens": 4,
                            "stream": True}) as r:
        list(r.iter_lines())
    statuses = [chat(gw, "over the limit", temperature=0.5).status_code for _ in range(6)]
    assert statuses.count(429) >= 2
    assert chat(gw, "other tenant", B).status_code == 200
    assert httpx.post(gw.url + "/v1/chat/completions", json={}, headers={"Authorization": "Bearer nope"},
                      timeout=5).status_code == 401
    time.sleep(0.5)

    records = gw.records()
    mine = [r for r in records if r["tenant"] == "team-a"]
    assert len(mine) == 3 + 2 + 1 + 2 + 6
    got = usage(gw, A)
    tot = got["totals"]
    assert {row["tenant"] for row in got["data"]} == {"team-a"}
    assert tot["requests"] == len(mine)
    assert tot["cache_hits"] == sum(r["cache"] == "hit" for r in mine) == 2
    assert tot["errors"] == sum(r["status"] >= 400 for r in mine)
    served = [r for r in mine if r["cache"] != "hit"]
    assert tot["prompt_tokens"] == sum(r["prompt_tokens"] for r in served)
    assert tot["completion_tokens"] == sum(r["completion_tokens"] for r in served)
    assert tot["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in mine))
    assert tot["saved_usd"] == pytest.approx(sum(r["saved_usd"] for r in mine)) and tot["saved_usd"] > 0

    text = gw.metrics()
    assert metric_value(text, "gateway_requests_total", tenant="team-a") == tot["requests"]
    assert metric_value(text, "gateway_prompt_tokens_total", tenant="team-a") == tot["prompt_tokens"]
    assert metric_value(text, "gateway_completion_tokens_total", tenant="team-a") == tot["completion_tokens"]
    assert metric_value(text, "gateway_cost_usd_total", tenant="team-a") == pytest.approx(tot["cost_usd"])
    assert metric_value(text, "gateway_cache_saved_usd_total", tenant="team-a") == pytest.approx(tot["saved_usd"])
    assert metric_value(text, "gateway_ratelimit_refusals_total", tenant="team-a") == statuses.count(429)

    # an admin sees everyone (the refused 401 included), and can filter by tenant and time
    everyone = usage(gw, ADMIN)
    assert everyone["totals"]["requests"] == len(records)
    assert {row["tenant"] for row in everyone["data"]} >= {"team-a", "team-b", "unauthenticated"}
    assert usage(gw, ADMIN, tenant="team-b")["totals"]["requests"] == 1
    assert usage(gw, A, tenant="team-b")["totals"]["requests"] == len(mine)  # a tenant cannot look elsewhere
    assert usage(gw, ADMIN, start=t0 + 7200)["totals"]["requests"] == 0  # whole hours: rounded down to t0's next
    assert usage(gw, ADMIN, start=t0 - 1, end=time.time() + 1)["totals"]["requests"] == len(records)

    # the CLI export holds every record, without prompt text
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"ledger.{fmt}"
        subprocess.run([sys.executable, "-m", "gateway", "ledger-export", "--config", str(gw.config_path),
                        "--format", fmt, "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
        text_out = out.read_text()
        assert "distinct" not in text_out and "over the limit" not in text_out
        if fmt == "jsonl":
            rows = [orjson.loads(line) for line in text_out.splitlines()]
        else:
            rows = list(csv.DictReader(io.StringIO(text_out)))
        assert sorted(r["request_id"] for r in rows) == sorted(r["request_id"] for r in records)


def test_usage_needs_a_key(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                           redis_server: RedisServer, redis_prefix: str) -> None:
    gw = gateway_factory(with_redis(simple_config(upstream.url, keys=KEYS), redis_server.url, redis_prefix))
    assert httpx.get(gw.url + "/v1/usage", timeout=5).status_code == 401
    assert httpx.get(gw.url + "/v1/usage", headers=A, params={"start": "yesterday"}, timeout=5).status_code == 400

"""The ledger without Redis (one SQLite file: restarts, --workers, bounds) and usage aggregates on every backend."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway import usage
from gateway.ledger import BATCH, Ledger
from gateway.ledger_memory import MemoryLedger
from gateway.ledger_sqlite import SqliteLedger
from gateway.store import InMemoryStore, RedisStore, StoreUnavailable
from tests.conftest import API_KEY, KEYS, ROOT, FakeUpstream, GatewayProcess, metric_value, simple_config, stop
from tests.redis_fixtures import RedisServer

A = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": "Bearer sk-admin"}


def chat(gw: GatewayProcess, content: str, headers: dict[str, str] = A) -> httpx.Response:
    body = {"model": "m1", "messages": [{"role": "user", "content": content}], "max_tokens": 3}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def usage_totals(gw: GatewayProcess, headers: dict[str, str] = ADMIN, **params: Any) -> dict[str, Any]:
    r = httpx.get(gw.url + "/v1/usage", headers=headers, params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["totals"]  # type: ignore[no-any-return]


def embedded_config(upstream: FakeUpstream, path: Path) -> dict[str, Any]:
    cfg = simple_config(upstream.url, keys=[*KEYS, {"tenant": "ops", "key": "sk-admin", "admin": True}])
    cfg["ledger"] = {"path": str(path)}
    return cfg


def record(i: int, tenant: str = "team-a", ts: float | None = None, **extra: Any) -> bytes:
    return orjson.dumps({"ts": time.time() if ts is None else ts, "request_id": f"r{i}", "tenant": tenant,
                         "served_model": "m1", "status": 200, "prompt_tokens": 10, "completion_tokens": 5,
                         "cost_usd": 0.25, "cost_pico_usd": 250_000_000_000, **extra})


def test_embedded_ledger_survives_a_restart_and_is_exported(gateway_factory: Callable[..., GatewayProcess],
                                                             upstream: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "state" / "ledger.sqlite3"
    cfg = embedded_config(upstream, db)
    gw = gateway_factory(cfg)
    for i in range(5):
        assert chat(gw, f"before {i}").status_code == 200
    before = usage_totals(gw)
    assert before["requests"] == 5 and before["prompt_tokens"] > 0
    stop(gw.proc)  # SIGTERM: the buffered records are written on the way out
    gw = gateway_factory(cfg)
    assert usage_totals(gw)["requests"] == 5, "a restart lost the ledger"
    for i in range(3):
        assert chat(gw, f"after {i}").status_code == 200
    after = usage_totals(gw)
    assert after["requests"] == 8
    assert after["cost_pico_usd"] == sum(r.get("cost_pico_usd", round(r["cost_usd"] * 1e12))
                                         for r in gw.records()) + before["cost_pico_usd"]
    out = subprocess.run([sys.executable, "-m", "gateway", "ledger-export", "--config", str(gw.config_path)],
                         cwd=ROOT, check=True, capture_output=True, timeout=60).stdout
    exported = [orjson.loads(line) for line in out.splitlines()]
    assert len(exported) == 8 and len({r["request_id"] for r in exported}) == 8
    assert "before 0" not in out.decode()  # no prompt text in the ledger


def test_two_workers_share_one_embedded_ledger(gateway_factory: Callable[..., GatewayProcess],
                                               upstream: FakeUpstream, tmp_path: Path) -> None:
    gw = gateway_factory(embedded_config(upstream, tmp_path / "shared.sqlite3"), workers=2)
    sent = 60
    with httpx.Client(timeout=30) as c:  # new connections, so that both workers get requests
        for i in range(sent):
            r = c.post(gw.url + "/v1/chat/completions", headers={**A, "Connection": "close"},
                       json={"model": "m1", "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 2})
            assert r.status_code == 200
    deadline = time.monotonic() + 10
    while usage_totals(gw)["requests"] < sent and time.monotonic() < deadline:  # the other worker flushes
        time.sleep(0.1)
    assert usage_totals(gw)["requests"] == sent
    assert metric_value(gw.metrics(), "gateway_requests_total", tenant="team-a") == sent


def test_workers_with_limits_and_no_shared_store_are_refused(upstream: FakeUpstream, tmp_path: Path) -> None:
    import yaml

    cfg = embedded_config(upstream, tmp_path / "l.sqlite3")
    cfg["tenants"] = {"team-a": {"limits": {"rpm": 10}}}
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "--workers 2 with rate limits or budgets needs a shared store" in p.stderr


async def test_sqlite_ledger_is_bounded_on_disk(tmp_path: Path) -> None:
    led = SqliteLedger(str(tmp_path / "b.sqlite3"), max_rows=1000, max_age_days=1, usage_days=30)
    await led.start()
    try:
        for b in range(12):
            lines = [record(b * 500 + i) for i in range(500)]
            await led.ledger_write("w", b + 1, lines, usage.fold(map(orjson.loads, lines)))
            await led.trim()
        old = [record(99_999, ts=time.time() - 3 * 86400)]
        await led.ledger_write("w", 13, old, usage.fold(map(orjson.loads, old)))
        size_at_6k = led.disk_bytes()
        for b in range(13, 25):
            lines = [record(b * 500 + i) for i in range(500)]
            await led.ledger_write("w", b + 1, lines, usage.fold(map(orjson.loads, lines)))
            await led.trim()
        rows, _ = await led.ledger_read(None, None, 100_000)
        assert len(rows) == 1000  # only the newest max_rows are kept
        assert all(orjson.loads(r)["request_id"] != "r99999" for r in rows)
        assert led.disk_bytes() <= size_at_6k * 1.2, "the file grows with the records written"
        # the aggregates keep every request, trimmed rows included
        groups = await led.usage_groups("team-a", None, None)
        assert sum(g["requests"] for g in groups.values()) == 12_001
    finally:
        await led.close()


async def test_usage_is_answered_in_whole_hours() -> None:
    led = MemoryLedger(1 << 20, 400)
    t0 = 1_790_000_000.0 - 1_790_000_000.0 % 3600  # an hour boundary
    lines = [record(1, ts=t0 + 10), record(2, ts=t0 + 3600 + 10), record(3, ts=t0 + 86400 * 2)]
    await led.ledger_write("w", 1, lines, usage.fold(map(orjson.loads, lines)))
    ledger = Ledger(led, 10, 1.0, lambda n: None, lambda n: None)
    got = await ledger.usage(t0 + 1800, t0 + 3600 + 1, "team-a")  # rounded out to [t0, t0 + 2h)
    assert got["totals"]["requests"] == 2 and got["covered_start"] == t0 and got["covered_end"] == t0 + 7200
    assert (await ledger.usage(None, None, None))["totals"]["requests"] == 3
    assert [row["day"] for row in (await ledger.usage(None, None, None))["data"]] == [
        usage.iso_day(usage.day_hour(t0)[0]), usage.iso_day(usage.day_hour(t0 + 2 * 86400)[0])]
    assert (await ledger.usage(None, None, "team-b"))["totals"]["requests"] == 0


async def test_redis_aggregates_count_a_resent_batch_once(redis_server: RedisServer, redis_prefix: str) -> None:
    store = RedisStore(redis_server.url, redis_prefix, 2.0, 0.0, "ledger", None, lambda op, e: None)
    try:
        lines = [record(i, tenant="team-a" if i % 3 else "team-b", cache="hit" if i == 4 else "miss")
                 for i in range(10)]
        groups = usage.fold(map(orjson.loads, lines))
        await store.ledger_write("writer-1", 1, lines, groups)
        await store.ledger_write("writer-1", 1, lines, groups)  # the reply was lost: the same batch again
        other = [record(10, tenant="team-b")]
        await store.ledger_write("writer-2", 1, other, usage.fold(map(orjson.loads, other)))  # another process
        got = await store.usage_groups(None, None, None)
        a = [g for k, g in got.items() if k[0] == "team-a"]
        assert sum(g["requests"] for g in a) == 6 and sum(g["cache_hits"] for g in a) == 1
        assert sum(g["requests"] for k, g in got.items() if k[0] == "team-b") == 4 + 1
        assert sum(g["cost_pico_usd"] for g in got.values()) == 11 * 250_000_000_000
        # one hash per tenant per day, hash-tagged so a tenant's keys share a Redis Cluster slot
        day = usage.day_hour(time.time())[0]
        assert redis_server.client().exists(f"{redis_prefix}{{t:team-a}}:u:{day}") == 1
        ledger = Ledger(store, 10, 1.0, lambda n: None, lambda n: None)
        exported = [r async for r in ledger.records()]
        assert len(exported) == 11  # the re-sent batch is in the stream twice; readers drop the repeats
    finally:
        await store.close()


async def test_ledger_buffer_is_bounded_by_bytes() -> None:
    class Away:
        name = "away"

        async def ledger_write(self, *a: Any) -> None:
            raise StoreUnavailable("away")

    dropped: list[int] = []
    ledger = Ledger(Away(), 1_000_000, 1.0, lambda n: None, dropped.append, max_bytes=100_000)  # type: ignore[arg-type]
    for i in range(2000):
        ledger.append(record(i))
    assert ledger.buffered_bytes <= 100_000 and len(ledger) < 2000 and sum(dropped) == 2000 - len(ledger)
    n = len(ledger)
    with pytest.raises(StoreUnavailable):
        await ledger.flush()
    assert len(ledger) == n and ledger._pending is not None and len(ledger._pending.lines) == min(BATCH, n)


async def test_in_process_cache_and_locks_are_bounded() -> None:
    store = InMemoryStore(max_cache_entries=100_000, max_cache_bytes=1024 * 1024)
    for i in range(2000):
        await store.cache_put(f"k{i}", b"x" * 4000, 60)
    assert store.cache_bytes <= 1024 * 1024 and len(store.cache) < 260
    assert await store.cache_get("k1999") is not None and await store.cache_get("k0") is None
    store.locks["abandoned"] = time.time() - 1  # a miss that neither stored nor unlocked
    store._next_sweep = 0.0
    await store.cache_lookup("another", 1000)
    assert "abandoned" not in store.locks and "another" in store.locks
    # limits: the spend of past days and months is forgotten, not kept for ever
    for day in range(20):
        store.limits.spend[f"gw:{{t:a}}:rl:t:d:2020{day:04d}"] = 5
    store.limits._charge("gw:{t:a}:rl:t:d:20991231", 1)
    assert not any(k.endswith("d:20200001") for k in store.limits.spend)


def test_memory_ledger_keeps_a_byte_budget() -> None:
    led = MemoryLedger(200_000, 400)
    for b in range(50):
        lines = [record(b * 100 + i) for i in range(100)]
        asyncio.run(led.ledger_write("w", b + 1, lines, usage.fold(map(orjson.loads, lines))))
    assert led.bytes <= 200_000 and len(led.rows) < 5000
    assert sum(g["requests"] for g in led.groups.values()) == 5000


async def test_sqlite_file_of_an_older_gateway_gets_the_new_counters(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, line BLOB NOT NULL);"
                     "CREATE TABLE usage (tenant TEXT NOT NULL, day INTEGER NOT NULL, hour INTEGER NOT NULL,"
                     " model TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,"
                     " PRIMARY KEY (tenant, day, hour, model)) WITHOUT ROWID;")
    db.close()
    led = SqliteLedger(str(path), 1000, 30, 30)
    await led.start()
    try:
        lines = [record(1)]
        await led.ledger_write("w", 1, lines, usage.fold(map(orjson.loads, lines)))
        groups = await led.usage_groups(None, None, None)
        assert [g["requests"] for g in groups.values()] == [1]
        assert [g["cost_pico_usd"] for g in groups.values()] == [250_000_000_000]
    finally:
        await led.close()

"""The spool: records and budget charges that cannot reach Redis wait in a local SQLite file, replayed exactly once.

Real parts: a private redis-server (killed and started again on its own AOF to make an outage), gateway
processes on the fake upstream, the spool file read with sqlite3. Faults are injected only where a
crash cannot be timed (between a Redis write and the spool's delete).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway import usage
from gateway.config import Limits
from gateway.ledger import Ledger
from gateway.limit_store import SETTLE_REPLAY_MS, TOMBSTONE_MS, Scope, Settlement
from gateway.spool import Spool, SpoolError
from gateway.store import RedisStore, StoreUnavailable
from tests.conftest import API_KEY, KEYS, FakeUpstream, GatewayProcess, metric_value, simple_config
from tests.redis_fixtures import RedisServer, with_redis

A = {"Authorization": f"Bearer {API_KEY}"}


# ------------------------------------------------------------------------------------------------ helpers


def spool_content(path: Path) -> tuple[list[str], int]:
    """The request ids of the ledger records in a spool file (as written), and its number of settles."""
    if not path.exists():
        return [], 0
    db = sqlite3.connect(path)
    try:
        ids = [orjson.loads(line)["request_id"] for (body,) in db.execute("SELECT body FROM batches")
               for line in bytes(body).split(b"\n")]
        settles = db.execute("SELECT count(*) FROM settles").fetchone()[0]
    finally:
        db.close()
    return ids, settles


def stream_ids(server: RedisServer, prefix: str = "gw:") -> list[str]:
    """Every ledger entry's request id, repeats included (the stream itself, not a reader that drops them)."""
    return [orjson.loads(f[b"r"])["request_id"] for _, f in server.client().xrange(prefix + "ledger")]


def stream_records(server: RedisServer, prefix: str = "gw:") -> list[dict[str, Any]]:
    return [orjson.loads(f[b"r"]) for _, f in server.client().xrange(prefix + "ledger")]


def month_spend(server: RedisServer, tenant: str = "team-a", prefix: str = "gw:") -> int:
    """The tenant's budget counters of every month (pico-USD): what settles charged."""
    c = server.client()
    return sum(int(c.get(k) or 0) for k in c.scan_iter(f"{prefix}{{t:{tenant}}}:rl:t:m:*"))


def record(i: int, tenant: str = "team-a") -> bytes:
    return orjson.dumps({"ts": time.time(), "request_id": f"r{i}", "tenant": tenant, "served_model": "m1",
                         "status": 200, "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.25,
                         "cost_pico_usd": 250_000_000_000})


def spool_config(upstream: FakeUpstream, spool: Path, **ledger: Any) -> dict[str, Any]:
    cfg = simple_config(upstream.url, keys=KEYS)
    cfg["tenants"] = {"team-a": {"limits": {"rpm": 100_000, "budget_day_usd": 1000, "budget_month_usd": 10_000}}}
    cfg["ledger"] = {"spool_path": str(spool), **ledger}
    return cfg


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.1)


class Load:
    """Clients sending requests (half of them streams) until stopped; each remembers which ids finished."""

    def __init__(self, url: str, clients: int = 3, stream_tokens: int = 4, headers: dict[str, str] = A,
                 keep_going: bool = False) -> None:
        self.url = url
        self.headers = headers
        self.keep_going = keep_going  # through a load balancer: a failure is one replica's, not the end
        self.ok: list[str] = []
        self.failed: list[str] = []
        self.tokens = stream_tokens
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(clients)]

    def _run(self, stream: bool) -> None:
        body = {"model": "m1", "messages": [{"role": "user", "content": "spool me"}], "max_tokens": self.tokens,
                "temperature": 0.7, "stream": stream}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                rid = uuid.uuid4().hex
                try:
                    r = client.post(self.url + "/v1/chat/completions", json=body,
                                    headers={**self.headers, "x-request-id": rid})
                    if stream:
                        done = r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
                    else:
                        done = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == self.tokens
                except (httpx.HTTPError, ValueError, KeyError):
                    done = False
                with self._lock:
                    (self.ok if done else self.failed).append(rid)
                if not done and not self.keep_going:
                    return  # the gateway is gone: this client stops

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def __exit__(self, *_: object) -> None:
        self.stop()


def chat(gw: GatewayProcess, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        rid = uuid.uuid4().hex
        r = httpx.post(gw.url + "/v1/chat/completions", headers={**A, "x-request-id": rid}, timeout=30,
                       json={"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             "temperature": 0.7})
        assert r.status_code == 200, r.text
        ids.append(rid)
    return ids


# ------------------------------------------------------------------------------------------------ in process


async def test_outage_spools_records_and_replays_them_once(own_redis: RedisServer, tmp_path: Path) -> None:
    store = RedisStore(own_redis.url, "gw:", 0.5, 0.0, "ledger", None, lambda op, e: None)
    spool = Spool(str(tmp_path / "spool.sqlite3"), 1 << 30)
    await spool.start()
    ledger = Ledger(store, 10_000, 1.0, lambda n: None, lambda n: None, spool=spool)
    try:
        for i in range(5):
            ledger.append(record(i))
        await ledger.flush()
        first_writer = ledger.writer
        own_redis.kill()
        for i in range(5, 1205):  # more than one batch
            ledger.append(record(i))
        with pytest.raises(StoreUnavailable):
            await ledger.flush()
        assert len(ledger) == 1200 and ledger._pending is not None  # the failed batch stays taken (frozen)
        assert await ledger.spill()
        assert len(ledger) == 0 and ledger.done == ledger.appended == 1205
        ids, _ = spool_content(tmp_path / "spool.sqlite3")
        assert sorted(ids) == sorted(f"r{i}" for i in range(5, 1205)), "the spool holds what Redis did not take"
        assert ledger.writer != first_writer, "the writer of a spooled batch is retired"
        with pytest.raises(StoreUnavailable):
            await ledger.replay()  # Redis still away: nothing is lost from the file
        assert spool.records == 1200

        own_redis.start()
        for i in range(1205, 1210):  # live writes of the new writer go first, the replay after: no matter
            ledger.append(record(i))
        await ledger.flush()
        assert await ledger.replay() == 1200
        assert spool.records == spool.batches == 0
        assert spool_content(tmp_path / "spool.sqlite3") == ([], 0)
        got = Counter(stream_ids(own_redis))
        assert set(got) == {f"r{i}" for i in range(1210)} and set(got.values()) == {1}
        groups = await store.usage_groups("team-a", None, None)
        assert sum(g["requests"] for g in groups.values()) == 1210
        assert sum(g["cost_pico_usd"] for g in groups.values()) == 1210 * 250_000_000_000
    finally:
        await spool.close()
        await store.close()


async def test_a_crash_between_the_redis_write_and_the_spool_delete_counts_nothing_twice(
        own_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "spool.sqlite3")
    store = RedisStore(own_redis.url, "gw:", 0.5, 0.0, "ledger", None, lambda op, e: None)
    try:
        spool = Spool(path, 1 << 30)
        ledger = Ledger(store, 10_000, 1.0, lambda n: None, lambda n: None, spool=spool)
        own_redis.kill()
        for i in range(700):
            ledger.append(record(i, tenant="team-a" if i % 2 else "team-b"))
        with pytest.raises(StoreUnavailable):
            await ledger.flush()
        assert await ledger.spill()
        own_redis.start()

        async def crash(self: Spool, batch_id: int) -> None:  # the process dies before the delete commits
            raise SpoolError("killed", "io")

        monkeypatch.setattr(Spool, "delete_batch", crash)
        assert await ledger.replay() == 700
        await spool.close()
        assert len(spool_content(Path(path))[0]) == 700, "every batch was written, none deleted"
        monkeypatch.undo()

        # the next gateway on the same file replays all of it again: Redis takes none of it twice
        spool = Spool(path, 1 << 30)
        await spool.start()
        assert spool.records == 700
        again = Ledger(store, 10_000, 1.0, lambda n: None, lambda n: None, spool=spool)
        assert await again.replay() == 700
        assert spool.records == 0
        await spool.close()
        got = Counter(stream_ids(own_redis))
        assert len(got) == 700 and set(got.values()) == {1}
        groups = await store.usage_groups(None, None, None)
        assert sum(g["requests"] for g in groups.values()) == 700
        assert sum(g["requests"] for k, g in groups.items() if k[0] == "team-b") == 350
    finally:
        await store.close()


async def test_a_batch_resent_after_a_lost_reply_is_in_the_stream_once(redis_server: RedisServer,
                                                                       redis_prefix: str) -> None:
    store = RedisStore(redis_server.url, redis_prefix, 2.0, 0.0, "ledger", None, lambda op, e: None)
    try:
        lines = [record(i) for i in range(3)]
        groups = usage.fold(map(orjson.loads, lines))
        for _ in range(3):  # the reply was lost twice
            await store.ledger_write("w1", 1, lines, groups)
        await store.ledger_write("w1", 2, [record(3)], usage.fold([orjson.loads(record(3))]))
        await store.ledger_write("w1", 1, lines, groups)  # late: an older batch of the same writer
        got = Counter(stream_ids(redis_server, redis_prefix))
        assert got == Counter({"r0": 1, "r1": 1, "r2": 1, "r3": 1})
    finally:
        await store.close()


async def test_a_replayed_settle_charges_once(redis_server: RedisServer, redis_prefix: str) -> None:
    """A settle whose admission never reached Redis (fail-open) charges its real cost once, however often it
    is replayed, also after the ordinary 60 s tombstone would have expired."""
    store = RedisStore(redis_server.url, redis_prefix, 2.0, 0.0, "ledger", None, lambda op, e: None)
    try:
        tag = f"{redis_prefix}{{t:team-a}}"
        scope = Scope(f"{tag}:rl:t", tag, Limits(budget_day=100.0), "team-a", 100 * 10**12, 0)
        st = Settlement("lease-1", 50, 7_000, 40, 5_000, True, SETTLE_REPLAY_MS)
        for _ in range(3):
            states = await store.settle([scope], st, retry=True)
        assert states[0].spend_day == 5_000
        ttl = redis_server.client().pttl(f"{tag}:rl:q:lease-1")
        assert ttl > TOMBSTONE_MS * 100, "a replayed settle's tombstone outlives any replay"
    finally:
        await store.close()


# ------------------------------------------------------------------------------------------------ gateways


def test_sigkill_during_a_redis_outage_loses_no_record_and_no_charge(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, own_redis: RedisServer,
        tmp_path: Path) -> None:
    spool = tmp_path / "replica-0" / "spool.sqlite3"
    cfg = with_redis(spool_config(upstream, spool), own_redis.url, "gw:", timeout_s=0.2, down_for_s=0.5)
    gw = gateway_factory(cfg)
    before = chat(gw, 5)
    own_redis.kill()
    with Load(gw.url) as load:
        time.sleep(2.0)  # the figure: 100 records lost 6 s into an outage; here 2 s of load
        gw.proc.kill()  # SIGKILL while requests are in flight
        gw.proc.wait()
    assert len(load.ok) > 20, "requests were served during the outage"
    in_spool, settles = spool_content(spool)
    missing = set(load.ok) - set(in_spool)
    assert not missing, f"{len(missing)} of {len(load.ok)} answered requests are not in the spool"
    assert settles >= len(load.ok), "every answered request's budget charge waits in the spool"

    own_redis.start()  # its own AOF: the state before the outage is back
    gw = gateway_factory(cfg)  # the same spool file: replayed at start
    wait_until(lambda: spool_content(spool) == ([], 0), "the spool replayed")
    ids = Counter(stream_ids(own_redis))
    served = before + load.ok
    assert all(ids[rid] == 1 for rid in served), {rid: ids[rid] for rid in served if ids[rid] != 1}
    assert set(ids.values()) == {1}, "no record twice"
    text = gw.metrics()
    assert metric_value(text, "gateway_ledger_spooled") == 0
    assert metric_value(text, "gateway_limit_settles_spooled") == 0
    assert metric_value(text, "gateway_ledger_replayed_total") == len(in_spool)
    assert metric_value(text, "gateway_ledger_dropped_total") == 0
    # the budget holds every charge once: the sum of the ledger's costs, up to the requests the kill cut
    # (their charge or their record may have reached the file alone, a few ms apart)
    records = [r for r in stream_records(own_redis) if r["tenant"] == "team-a"]
    costs = sum(r["cost_pico_usd"] for r in records)
    cut = len(load.failed)
    assert cut <= 3
    one = max(r["cost_pico_usd"] for r in records)
    print(f"sigkill: {len(load.ok)} answered during the outage, {len(in_spool)} records and {settles} settles "
          f"spooled, {cut} cut; budget {month_spend(own_redis)} pico-USD vs ledger costs {costs}")
    assert abs(month_spend(own_redis) - costs) <= cut * one, (month_spend(own_redis), costs, cut, one)


def test_graceful_stop_during_a_redis_outage_loses_nothing(
        gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream, own_redis: RedisServer,
        tmp_path: Path) -> None:
    spool = tmp_path / "replica-0" / "spool.sqlite3"
    cfg = with_redis(spool_config(fake, spool), own_redis.url, "gw:", timeout_s=0.2, down_for_s=0.5)
    gw = gateway_factory(cfg)
    before = chat(gw, 3)
    own_redis.kill()
    fake.control(itl_ms=40)  # answers of 20 tokens: ~0.8 s, in flight when the stop comes
    with Load(gw.url, clients=4, stream_tokens=20) as load:
        time.sleep(2.5)
        gw.proc.terminate()  # SIGTERM: running requests finish, then the gateway exits
        gw.proc.wait(60)
    assert gw.proc.returncode in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down
    assert len(load.ok) >= 6
    in_spool, settles = spool_content(spool)
    assert set(load.ok) <= set(in_spool)
    assert settles >= len(load.ok)

    fake.control(itl_ms=0)
    own_redis.start()
    gw = gateway_factory(cfg)
    wait_until(lambda: spool_content(spool) == ([], 0), "the spool replayed")
    ids = Counter(stream_ids(own_redis))
    assert all(ids[rid] == 1 for rid in before + load.ok) and set(ids.values()) == {1}
    records = [r for r in stream_records(own_redis) if r["tenant"] == "team-a"]
    assert len(records) == len(before) + len(load.ok) + sum(1 for rid in load.failed if rid in ids)
    # every request the gateway finished is charged exactly once: the budget is the ledger's sum
    costs = sum(r["cost_pico_usd"] for r in records)
    print(f"sigterm: {len(load.ok)} answered during the outage, {len(in_spool)} records and {settles} settles "
          f"spooled; budget {month_spend(own_redis)} pico-USD vs ledger costs {costs}")
    assert month_spend(own_redis) == costs
    assert metric_value(gw.metrics(), "gateway_ledger_dropped_total") == 0


def test_two_workers_share_one_spool(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                     own_redis: RedisServer, tmp_path: Path) -> None:
    """`--workers 2` (the image's default): both processes spool into the replica's one file, and after a
    restart one replays it (the other waits on the lock): each record and charge once."""
    spool = tmp_path / "replica-0" / "spool.sqlite3"
    cfg = with_redis(spool_config(upstream, spool), own_redis.url, "gw:", timeout_s=0.2, down_for_s=0.5)
    gw = gateway_factory(cfg, workers=2)
    own_redis.kill()
    served = []
    with httpx.Client(timeout=30) as c:  # a new connection each: both workers get requests
        for _ in range(40):
            rid = uuid.uuid4().hex
            r = c.post(gw.url + "/v1/chat/completions", headers={**A, "x-request-id": rid, "Connection": "close"},
                       json={"model": "m1", "messages": [{"role": "user", "content": "w"}], "max_tokens": 2,
                             "temperature": 0.7})
            assert r.status_code == 200
            served.append(rid)
    in_spool, settles = spool_content(spool)
    assert sorted(in_spool) == sorted(served) and settles == len(served)
    db = sqlite3.connect(spool)
    writers = {w for (w,) in db.execute("SELECT writer FROM batches")}
    db.close()
    assert len(writers) >= 2, "batches of more than one writer in the one file"
    gw.proc.terminate()
    gw.proc.wait(60)
    own_redis.start()
    gw = gateway_factory(cfg, workers=2)
    wait_until(lambda: spool_content(spool) == ([], 0), "the spool replayed")
    assert Counter(stream_ids(own_redis)) == Counter(served)
    records = stream_records(own_redis)
    assert month_spend(own_redis) == sum(r["cost_pico_usd"] for r in records)


def test_a_full_spool_drops_and_counts(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream,
                                       own_redis: RedisServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite3"
    cfg = with_redis(spool_config(upstream, spool, spool_max_bytes=65536), own_redis.url, "gw:",
                     ledger_buffer=5, timeout_s=0.2, down_for_s=0.5)
    gw = gateway_factory(cfg)
    own_redis.kill()
    sent = 0
    deadline = time.monotonic() + 60
    while metric_value(gw.metrics(), "gateway_ledger_dropped_total") < 3 and time.monotonic() < deadline:
        chat(gw, 10)
        sent += 10
    text = gw.metrics()
    dropped = metric_value(text, "gateway_ledger_dropped_total")
    assert dropped >= 3, "past the spool's bound and the buffer, records are dropped and counted"
    assert metric_value(text, "gateway_spool_errors_total", reason="full") > 0
    spooled = metric_value(text, "gateway_ledger_spooled")
    db = sqlite3.connect(spool)
    on_disk = db.execute("SELECT (SELECT coalesce(sum(bytes), 0) FROM batches) + "
                         "(SELECT coalesce(sum(bytes), 0) FROM settles)").fetchone()[0]
    db.close()
    assert spooled > 0 and on_disk <= 65536
    # nothing vanishes uncounted: in the spool, in memory, or counted as dropped
    assert spooled + metric_value(text, "gateway_ledger_buffered") + dropped == sent


def test_an_unwritable_spool_keeps_records_in_memory(gateway_factory: Callable[..., GatewayProcess],
                                                     upstream: FakeUpstream, own_redis: RedisServer) -> None:
    """A spool that cannot be written (here: a path under /proc) is counted; serving and the ledger go on as
    without a spool: the records wait in memory and reach Redis when it answers."""
    cfg = with_redis(spool_config(upstream, Path("/proc/no-such-dir/spool.sqlite3")), own_redis.url, "gw:",
                     timeout_s=0.2, down_for_s=0.5)
    gw = gateway_factory(cfg)
    own_redis.kill()
    served = chat(gw, 4)
    text = gw.metrics()
    assert metric_value(text, "gateway_spool_errors_total", reason="io") > 0
    assert metric_value(text, "gateway_ledger_buffered") == 4
    assert metric_value(text, "gateway_ledger_dropped_total") == 0
    own_redis.start()
    wait_until(lambda: Counter(stream_ids(own_redis)) == Counter(served), "the buffered records written")
    wait_until(lambda: month_spend(own_redis) > 0 and metric_value(gw.metrics(), "gateway_limit_settles_pending") == 0,
               "the kept settles applied")


# ------------------------------------------------------------------------------------------------ scale-out


def test_replica_killed_during_a_redis_outage_behind_haproxy(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The issue's case on the shipped scale-out stack (HAProxy, Sentinel, 3 replicas): every Redis node
    down, load through HAProxy, one replica SIGKILLed; then Redis and the replica come back."""
    from deploy.local.scaleout import ScaleOut, missing_tools, redis_cmd

    if missing := missing_tools():
        pytest.skip(f"needs Debian packages {' '.join(missing)} (scripts/test.sh installs them)")
    key = "sk-spool-scaleout"
    deployment = {"name": "fake-a", "url": "${UPSTREAM_URL}", "model": "fake-model"}
    cfg: dict[str, Any] = {
        "auth": {"keys": [{"tenant": "spool", "key": key}]},
        "tenants": {"spool": {"limits": {"rpm": 100_000, "budget_day_usd": 1000, "budget_month_usd": 10_000}}},
        "models": {"m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}, "deployments": [deployment]}},
        "redis": {"down_for_s": 0.2},
    }
    headers = {"Authorization": f"Bearer {key}"}
    with ScaleOut(tmp_path_factory.mktemp("spool-scaleout"), replicas=3, gateway_config=cfg) as stack:
        for node in stack.redis_nodes:  # what Redis acknowledged before the kill is on its disk (not everysec)
            assert redis_cmd(node.port, "CONFIG", "SET", "appendfsync", "always").startswith("+OK")
        with Load(stack.url, clients=6, headers=headers, keep_going=True) as load:
            time.sleep(1.0)
            stack.kill_redis()
            time.sleep(2.0)
            stack.kill_gateway(2)
            time.sleep(1.0)
        spools = [stack.workdir / f"gateway-{i}-state" / "spool.sqlite3" for i in range(3)]
        in_spool, settles = spool_content(spools[2])
        log = stack.workdir / "gateway-2-requests.jsonl"
        served_by_2 = {orjson.loads(line)["request_id"] for line in log.read_bytes().splitlines()} & set(load.ok)
        assert len(in_spool) > 10 and settles > 10, "the killed replica served requests during the outage"
        assert len(load.ok) > 60

        stack.restart_redis()
        stack.restart_gateway(2)
        wait_until(lambda: all(spool_content(p) == ([], 0) for p in spools), "every replica's spool replayed", 60)
        master = RedisServer(f"redis://127.0.0.1:{stack.master_port()}/0", stack.master_port())
        ids = Counter(stream_ids(master))
        lost = [rid for rid in load.ok if ids[rid] != 1]
        assert not lost, f"{len(lost)} of {len(load.ok)} answered requests not in the ledger exactly once"
        assert set(ids.values()) == {1}
        assert served_by_2 and all(ids[rid] == 1 for rid in served_by_2)
        records = [r for r in stream_records(master) if r["tenant"] == "spool"]
        costs = sum(r["cost_pico_usd"] for r in records)
        cut = sum(1 for rid in load.failed if rid not in ids)  # requests the kill cut (HAProxy retried none)
        one = max(r["cost_pico_usd"] for r in records)
        spend = month_spend(master, "spool")
        print(f"haproxy: {len(load.ok)} answered, {len(served_by_2)} by the killed replica, {len(in_spool)} records "
              f"and {settles} settles in its spool, {cut} cut by the kill; ledger {len(ids)} records, budget {spend} "
              f"pico-USD vs ledger costs {costs}")
        assert abs(spend - costs) <= cut * one, (spend, costs, cut, one)

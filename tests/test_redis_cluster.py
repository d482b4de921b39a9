"""Redis Cluster (redis+cluster://): a real local cluster of 3 masters and 3 replicas (tests/redis_cluster_fixtures.py).

- every call the store makes keeps its keys in one hash slot, and tenants spread over the masters;
- limits are exact across 3 gateway processes under 80 concurrent requests, the ledger has one record
  per answered request and /v1/usage adds up the per-tenant sums from every master;
- a master failover under load (a manual CLUSTER FAILOVER, then SIGKILL of the master holding the
  ledger stream): no request fails, no finished request's record is lost, and the tenants whose slots
  live on the other masters keep their limits throughout (outages are marked per slot).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from redis.crc import key_slot

from gateway import usage
from gateway.config import Limits
from gateway.limit_store import Admission, Scope, Settlement
from gateway.redis_client import ClusterTarget, check_url, parse_cluster_url
from gateway.store import RedisStore
from tests.conftest import FakeUpstream, GatewayProcess, metric_value, simple_config
from tests.redis_cluster_fixtures import LocalCluster, redis_cluster  # noqa: F401  (fixture)


def tenants_per_master(cluster: LocalCluster, prefix: str, stem: str) -> list[str]:
    """One tenant name per master (in the masters' slot order): its limit keys' hash slot is on that master."""
    ranges = sorted(rng for role, _, rng in cluster.topology().values() if role == "master" and rng)
    out = []
    for lo, hi in ranges:
        out.append(next(f"{stem}{i}" for i in range(10_000)
                        if lo <= key_slot(f"{prefix}{{t:{stem}{i}}}".encode()) <= hi))
    return out


def stream_ids(cluster: LocalCluster, key: str) -> list[dict[str, Any]]:
    node = cluster.node(cluster.master_of(key)).client()
    return [orjson.loads(f[b"r"]) for _, f in node.xrange(key)]


def cluster_config(upstream_url: str, url: str, prefix: str, tenants: dict[str, dict[str, Any]],
                   keys: list[dict[str, Any]], **redis: Any) -> dict[str, Any]:
    cfg = simple_config(upstream_url, keys=keys)
    cfg["tenants"] = {t: {"limits": lim} for t, lim in tenants.items()}
    cfg["cache"] = {"mode": "off"}
    cfg["redis"] = {"url": url, "key_prefix": prefix, "ledger_flush_interval_s": 0.05, "timeout_s": 2.0, **redis}
    return cfg


def chat(i: int) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 2}


# ------------------------------------------------------------------------------------------------ URL


def test_cluster_url_is_parsed_and_checked() -> None:
    assert parse_cluster_url("redis+cluster://h1:7000,[::1]:7001") == \
        ClusterTarget((("h1", 7000), ("::1", 7001)))
    assert parse_cluster_url("rediss+cluster://app:s%40cret@h1:7000/") == \
        ClusterTarget((("h1", 7000),), "app", "s@cret", True)
    assert parse_cluster_url("rediss+cluster://h1:7000?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required") == \
        ClusterTarget((("h1", 7000),), tls=True,
                      tls_options=(("ssl_ca_certs", "/ca.pem"), ("ssl_cert_reqs", "required")))
    for url, problem in (("redis+cluster://h1:7000,h2", "cluster node address 'h2' is not host:port"),
                         ("redis+cluster://h1:7000/3", "only database 0"),
                         ("redis+cluster://h1:7000?ssl_ca_certs=/ca.pem", "unknown query parameter"),
                         ("rediss+cluster://h1:7000?password=x", "unknown query parameter.s. password"),
                         ("rediss+cluster://h1:7000?ssl_cert_reqs=maybe", "is not none, optional or required")):
        with pytest.raises(ValueError, match=problem):
            check_url(url)


# ------------------------------------------------------------------------------------------------ slots


async def test_every_call_keeps_its_keys_in_one_slot(redis_cluster: LocalCluster) -> None:  # noqa: F811
    """Each store call on a real cluster: Redis refuses a multi-key call across slots (CROSSSLOT), so every
    call succeeding is the check; then every key a tenant owns is in its tag's slot, on all 3 masters."""
    prefix = "slots:"
    tenants = tenants_per_master(redis_cluster, prefix, "tenant-")
    errors: list[tuple[str, str]] = []
    store = RedisStore(redis_cluster.url, prefix, 2.0, 1.0, "ledger", None, lambda op, e: errors.append((op, repr(e))))
    await store.start()
    try:
        for n, t in enumerate(tenants):
            tag = f"{prefix}{{t:{t}}}"
            lim = Limits(rpm=100, tpm=100_000, concurrency=5, budget_day=1.0, budget_month=10.0)
            scopes = (Scope(f"{tag}:rl:k:0123456789ab", tag, lim), Scope(f"{tag}:rl:t", tag, lim, t, 10**12, 10**13))
            r = await store.admit(scopes, Admission(f"lease{n}", 50, 10**6, 60_000))
            assert r.ok, r
            states = await store.settle(scopes, Settlement(f"lease{n}", 50, 10**6, 20, 4 * 10**5, True, 60_000))
            assert [s.requests for s in states] == [1, 1] and [s.tokens for s in states] == [20, 20]
            # a settle whose admit never ran (the fail-open path) counts the real usage
            await store.settle(scopes, Settlement(f"never{n}", 50, 10**6, 7, 100, True, 60_000))
            key = f"{n}" * 64
            assert await store.cache_lookup(key, 1000) == (None, True)  # entry and lock: one slot
            await store.cache_put(key, b"entry", 60)
            assert await store.cache_lookup(key, 1000) == (b"entry", False)
            assert await store.cache_lookup("f" * 63 + f"{n}", 1000) == (None, True)
            await store.cache_unlock("f" * 63 + f"{n}")
        now = time.time()
        records = [{"tenant": t, "ts": now, "model": "m1", "request_id": f"r{i}{t}", "status": 200,
                    "prompt_tokens": 3, "completion_tokens": 2} for i in range(4) for t in tenants]
        lines = [orjson.dumps(r) for r in records]
        await store.ledger_write("writer1", 1, lines, usage.fold(records))
        await store.ledger_write("writer1", 1, lines, usage.fold(records))  # a retried batch: sums once
        groups = await store.usage_groups(None, None, None)
        assert sorted({k[0] for k in groups}) == sorted(tenants)
        assert all(g["requests"] == 4 and g["prompt_tokens"] == 12 for g in groups.values())
        rows, cursor = await store.ledger_read(None, None, 100)
        assert len(rows) == len(lines) and cursor is None  # the stream took the batch once (LEDGER_LUA, its slot)
    finally:
        await store.close()
    assert errors == []

    masters = [p for p, (role, _, _) in redis_cluster.topology().items() if role == "master"]
    owners: dict[str, set[int]] = {}
    for port in masters:
        for k in redis_cluster.node(port).client().scan_iter(match=f"{prefix}*", count=1000):
            key = k.decode()
            assert redis_cluster.master_of(key) == port
            for t in tenants:
                if key.startswith(f"{prefix}{{t:{t}}}"):
                    assert key_slot(k) == key_slot(f"{prefix}{{t:{t}}}".encode()), key
                    owners.setdefault(t, set()).add(port)
    assert sorted(owners) == sorted(tenants)
    assert all(len(ports) == 1 for ports in owners.values())  # a tenant's keys: one master
    assert len({p for ports in owners.values() for p in ports}) == 3  # the tenants: all three masters


# ------------------------------------------------------------------------------------------------ limits


def test_limits_exact_across_three_gateways_under_80_concurrent_requests(
        redis_cluster: LocalCluster, upstream: FakeUpstream,  # noqa: F811
        gateway_factory: Callable[..., GatewayProcess]) -> None:
    prefix = "lim:"
    a, b, c = tenants_per_master(redis_cluster, prefix, "team-")
    keys = [{"tenant": a, "key": "sk-a1", "limits": {"rpm": 8}}, {"tenant": a, "key": "sk-a2"},
            {"tenant": b, "key": "sk-b"}, {"tenant": c, "key": "sk-c"}]
    cfg = cluster_config(upstream.url, redis_cluster.url, prefix, {a: {"rpm": 20}, b: {"rpm": 15}, c: {"rpm": 10}},
                         keys)
    gws = [gateway_factory(cfg) for _ in range(3)]
    before = upstream.counters()["requests"]
    key_of = ["sk-a1", "sk-b", "sk-c", "sk-a2", "sk-b", "sk-c"]

    def one(i: int) -> tuple[str, httpx.Response]:
        key = key_of[i % len(key_of)]
        return key, httpx.post(gws[i % 3].url + "/v1/chat/completions", json=chat(i),
                               headers={"Authorization": f"Bearer {key}"}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        results = list(pool.map(one, range(80)))
    ok = {k: sum(1 for kk, r in results if kk == k and r.status_code == 200) for k in set(key_of)}
    assert {r.status_code for _, r in results} == {200, 429}
    assert ok["sk-a1"] <= 8 and ok["sk-a1"] + ok["sk-a2"] == 20, ok
    assert ok["sk-b"] == 15 and ok["sk-c"] == 10, ok
    assert upstream.counters()["requests"] - before == 45

    # the ledger: one record per request (answered or refused), each once; /v1/usage adds up the sums that
    # each tenant's master holds
    every = {r.headers["x-request-id"] for _, r in results}
    answered = {r.headers["x-request-id"] for _, r in results if r.status_code == 200}
    deadline = time.monotonic() + 20
    while True:
        recs = stream_ids(redis_cluster, prefix + "ledger")
        if {r["request_id"] for r in recs} >= every or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(r["request_id"] for r in recs) == sorted(every)
    assert sorted(r["request_id"] for r in recs if r["status"] == 200) == sorted(answered)
    for tenant, key in ((a, "sk-a2"), (b, "sk-b"), (c, "sk-c")):
        mine = [r for r in recs if r["tenant"] == tenant]
        want = (len(mine), sum(r["completion_tokens"] for r in mine))
        while True:  # a batch's stream entries and its sums are separate calls on a Cluster: moments apart
            u = httpx.get(gws[0].url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
            got = (u["totals"]["requests"], u["totals"]["completion_tokens"])
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == want, tenant


# ------------------------------------------------------------------------------------------------ failover


@dataclass
class Result:
    tenant: str
    status: int
    request_id: str
    start: float
    end: float


def test_master_failover_under_load_loses_no_finished_record(
        redis_cluster: LocalCluster, upstream: FakeUpstream,  # noqa: F811
        gateway_factory: Callable[..., GatewayProcess]) -> None:
    prefix = "fo:"
    stream = prefix + "ledger"
    tenants = tenants_per_master(redis_cluster, prefix, "org-")
    keys = [{"tenant": t, "key": f"sk-{t}"} for t in tenants]
    cfg = cluster_config(upstream.url, redis_cluster.url, prefix, dict.fromkeys(tenants, {"rpm": 1_000_000}), keys,
                         timeout_s=0.5, down_for_s=0.2)
    gws = [gateway_factory(cfg) for _ in range(3)]
    ledger_master = redis_cluster.master_of(stream)
    replica = redis_cluster.replica_of(ledger_master)
    # the tenant whose limit keys share the ledger's master fails open while it is replaced; the others must not
    exposed = {t for t in tenants if redis_cluster.master_of(f"{prefix}{{t:{t}}}") == ledger_master}
    results: list[Result] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(n: int) -> None:
        tenant = tenants[n % 3]
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                r = client.post(gws[(n + i) % 3].url + "/v1/chat/completions", json=chat(i),
                                headers={"Authorization": f"Bearer sk-{tenant}"})
                with lock:
                    results.append(Result(tenant, r.status_code, r.headers.get("x-request-id", ""), t0,
                                          time.monotonic()))
                i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(9)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        # 1. a manual failover (maintenance): the replica takes over once it has every write of the master
        redis_cluster.node(replica).client().execute_command("CLUSTER", "FAILOVER")
        manual_s = redis_cluster.wait_master(replica)
        time.sleep(1.5)
        # 2. the master now holding the ledger stream dies; the old master, its replica again, is promoted
        assert redis_cluster.master_of(stream) == replica
        killed_at = time.monotonic()
        redis_cluster.kill(replica)
        promoted_s = redis_cluster.wait_master(ledger_master)
        redis_cluster.wait_healthy()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()

    statuses = {s: sum(1 for r in results if r.status == s) for s in {r.status for r in results}}
    assert statuses.keys() == {200}, statuses
    during = [r for r in results if killed_at <= r.start <= killed_at + promoted_s]
    assert during, "requests were served while the ledger's master was being replaced"
    for gw in gws:  # every replica's buffer drains into the promoted master
        deadline = time.monotonic() + 20
        while metric_value(gw.metrics(), "gateway_ledger_buffered") and time.monotonic() < deadline:
            time.sleep(0.1)
    answered = {r.request_id for r in results}
    in_ledger = {r["request_id"] for r in stream_ids(redis_cluster, stream)}
    lost = answered - in_ledger
    fail_open = {t: sum(metric_value(g.metrics(), "gateway_limits_fail_open_total", tenant=t) for g in gws)
                 for t in tenants}
    dropped = sum(metric_value(g.metrics(), "gateway_ledger_dropped_total") for g in gws)
    slowest = max(r.end - r.start for r in results)
    print(f"\ncluster failover: manual {manual_s:.2f} s, SIGKILL to promotion {promoted_s:.2f} s; "
          f"{len(results)} requests ({len(during)} started during the promotion), slowest {slowest:.2f} s; "
          f"ledger records missing {len(lost)}, dropped {dropped:g}; fail-open admissions {fail_open} "
          f"(tenant on the killed master: {sorted(exposed)})")
    assert not lost, f"{len(lost)} of {len(answered)} answered requests have no ledger record"
    assert dropped == 0
    # the settles the dead master did not take were retried on the promoted one
    assert all(metric_value(g.metrics(), "gateway_limit_settles_pending") == 0 for g in gws)
    assert sum(metric_value(g.metrics(), "gateway_limit_settles_dropped_total") for g in gws) == 0
    assert all(fail_open[t] == 0 for t in tenants if t not in exposed), fail_open


"""A hostile tenant against limits and budgets (issue 12): no argument, query or Redis blip switches them off.

Real Redis (private servers where a test stalls one), the gateway process and the fake upstream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from gateway.config import Limits, parse_config
from gateway.errors import GatewayError
from gateway.limit_store import Admission, MemoryLimits, Scope, Settlement
from gateway.limits import StoreLimiter
from gateway.record import RequestRecord
from gateway.reservation import BYTES_PER_TOKEN_TYPICAL, OutputBounds, reserve
from gateway.store import RedisStore, StoreCommandError, StoreUnavailable
from tests.conftest import API_KEY, OTHER_KEY, FakeUpstream, GatewayProcess, simple_config, start_fake_upstream
from tests.redis_fixtures import RedisServer, start_redis, with_redis
from tests.vllm_fixtures import stack_config

A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": f"Bearer {OTHER_KEY}"}
KEYS = [{"tenant": "team-a", "key": API_KEY}, {"tenant": "team-b", "key": OTHER_KEY}]
CHAT = "/v1/chat/completions"


def post(gw: GatewayProcess, body: dict[str, Any], headers: dict[str, str] = A, path: str = CHAT,
         timeout: float = 30) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=timeout)


def limited(upstream_url: str, tenants: dict[str, Any], **limits: Any) -> dict[str, Any]:
    cfg = {**simple_config(upstream_url, keys=KEYS), "tenants": {t: {"limits": lim} for t, lim in tenants.items()}}
    if limits:
        cfg["limits"] = limits
    return cfg


# ------------------------------------------------------------------------------------------------ 1. /v1/usage

HOSTILE_USAGE = ["start=1e17", "start=inf", "start=nan", "start=-5", "start=1e400", "end=-inf", "start=-1e17",
                 "start=2026-13-45", "end=99999999999999999999", "start=" + "9" * 100, "start=10&end=5"]


def test_hostile_usage_queries_are_400_and_do_not_switch_limits_off(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis_server: RedisServer,
        redis_prefix: str) -> None:
    """Before the fix, `start=1e17` made Redis answer an error, the store marked Redis down, limits failed open."""
    cfg = limited(upstream.url, {"team-a": {"rpm": 10}, "team-b": {"budget_day_usd": 0.000001}})
    cfg["models"]["m1"]["prices"] = {"prompt_per_1m": 0, "completion_per_1m": 1.0}  # $0.000001 per token
    gw = gateway_factory(with_redis(cfg, redis_server.url, redis_prefix))
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    statuses = []
    for i in range(40):
        q = HOSTILE_USAGE[i % len(HOSTILE_USAGE)]
        u = httpx.get(f"{gw.url}/v1/usage?{q}", headers=A, timeout=10)
        assert u.status_code == 400, (q, u.status_code, u.text)
        err = u.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] in ("start", "end"), (q, err)
        statuses.append(post(gw, body).status_code)
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    # a tenant whose daily budget is spent gets nothing through, with or without bad queries
    b = []
    for q in HOSTILE_USAGE[:5]:
        httpx.get(f"{gw.url}/v1/usage?{q}", headers=B, timeout=10)
        b.append(post(gw, body, B).status_code)
    assert b == [200, 429, 429, 429, 429]
    assert not any(r.get("limited_by") == "skipped" for r in gw.records())
    ok = httpx.get(f"{gw.url}/v1/usage?start=0&end=253402300799", headers=A, timeout=10)
    assert ok.status_code == 200 and ok.json()["totals"]["requests"] >= 10


async def test_a_redis_command_error_is_that_commands_error_never_an_outage(redis_server: RedisServer,
                                                                             redis_prefix: str) -> None:
    errors: list[str] = []
    store = RedisStore(redis_server.url, redis_prefix, 2.0, 5.0, "ledger", None, lambda op, e: errors.append(op))
    try:
        with pytest.raises(StoreCommandError):
            await store._run("ledger_read", lambda: store.client.xrange(  # not a valid stream ID
                redis_prefix + "ledger", "100000000000000000000", "+", 10))
        assert store.down_until == 0.0 and errors == ["ledger_read"]
        scope = Scope(redis_prefix + "{t:x}:rl:t", redis_prefix + "{t:x}", Limits(rpm=1), "x")
        r = await store.admit([scope], Admission("l1", 1, 0, 60_000))  # limits still checked right after
        assert r.ok
        r = await store.admit([scope], Admission("l2", 1, 0, 60_000))
        assert not r.ok and r.refused_limit == "rpm"
    finally:
        await store.close()
    dead = RedisStore("redis://127.0.0.1:1/0", redis_prefix, 0.2, 5.0, "ledger", None, lambda op, e: None)
    try:
        with pytest.raises(StoreUnavailable) as e:
            await dead.ping()
        assert not isinstance(e.value, StoreCommandError) and dead.down_until > 0  # a real outage still counts
    finally:
        await dead.close()


# ------------------------------------------------------------------------------------------------ 2. reservation

def test_the_output_bound_is_set_and_capped_in_the_body() -> None:
    b = OutputBounds(default_max_tokens=50, max_output_tokens=100)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    prompt, completion = reserve(body, "chat", b)
    assert body["max_tokens"] == 50 and completion == 50 and prompt > 0
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000,
            "max_tokens": 3}
    _, completion = reserve(body, "chat", b)  # vLLM reads max_completion_tokens first: both end up at the cap
    assert body["max_completion_tokens"] == body["max_tokens"] == 100 == completion
    body = {"model": "m", "prompt": ["a", "b", "c", "d"], "n": 3, "max_tokens": 10}
    _, completion = reserve(body, "completions", b)
    assert completion == 10 * 3 * 4  # every prompt of a list generates n sequences
    body = {"model": "m", "prompt": "a", "n": 2, "best_of": 5, "max_tokens": 10}
    assert reserve(body, "completions", b)[1] == 50
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 10}  # one tokenized prompt, not three
    assert reserve(body, "completions", b) == (3, 10)
    body = {"model": "m", "input": ["a", "b"]}
    assert reserve(body, "embeddings", b)[1] == 0 and "max_tokens" not in body
    # a context window known to the gateway keeps the default inside it; without a tokenizer the prompt's
    # byte bound is ~4x a real count, so the clamp takes a typical size (vLLM refuses what does not fit)
    body = {"model": "m", "messages": [{"role": "user", "content": "y" * 400}]}
    p, c = reserve(body, "chat", OutputBounds(default_max_tokens=256, context_window=150))
    assert p >= 400 and body["max_tokens"] == c == 150 - p // BYTES_PER_TOKEN_TYPICAL


def test_tools_images_and_non_ascii_count_in_the_prompt_estimate() -> None:
    b = OutputBounds(default_max_tokens=1, media_part_tokens=1000)
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    base = reserve(dict(plain), "chat", b)[0]
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 200,
                                               "parameters": {"type": "object", "properties": {}}}}
             for i in range(100)]
    assert reserve({**plain, "tools": tools}, "chat", b)[0] - base > 27_000 / 4 * 0.9  # 27 KB of tools
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}
    assert reserve(image, "chat", b)[0] >= base + 2000
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"k" * 4000: {}}}}}
    assert reserve({**plain, "response_format": schema}, "chat", b)[0] >= base + 1000
    cjk = {"messages": [{"role": "user", "content": "漢" * 100}]}
    assert reserve(cjk, "chat", b)[0] >= base + 200  # non-ASCII text is not 4 characters a token
    deep: Any = "x"
    for _ in range(5000):  # deeper than any recursion limit or JSON encoder: still estimated, no exception
        deep = [deep]
    assert reserve({**plain, "tools": deep}, "chat", b)[0] > base


@pytest.mark.parametrize("field,value", [("max_tokens", 400.0), ("max_tokens", "2000"), ("max_tokens", True),
                                         ("max_completion_tokens", 400.0), ("max_completion_tokens", "2000"),
                                         ("max_tokens", 0), ("max_tokens", -1), ("n", "3"), ("n", 2.0),
                                         ("n", 0), ("best_of", "9")])
def test_numbers_must_be_json_integers_never_a_default(field: str, value: Any) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}
    with pytest.raises(GatewayError) as e:
        reserve(body, "chat", OutputBounds(default_max_tokens=16))
    assert e.value.status == 400 and e.value.param == field


def test_the_body_sent_upstream_carries_the_bound(gateway_factory: Callable[..., GatewayProcess],
                                                  upstream: FakeUpstream) -> None:
    cfg = simple_config(upstream.url, keys=KEYS)  # no limits configured: the bound is still set
    cfg["limits"] = {"default_max_tokens": 7, "max_output_tokens": 20}
    gw = gateway_factory(cfg)
    r = post(gw, {"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
    assert upstream.state()["counters"]["last_request"]["max_tokens"] == 7
    r = post(gw, {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    r = post(gw, {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.fixture
def chatty_upstream() -> Iterator[FakeUpstream]:
    """Generates 1000 tokens whenever the body names no max_tokens (like vLLM up to the context window)."""
    fake = start_fake_upstream(["m1"], "--tokens", "1000")
    yield fake
    fake.kill()


def hostile_bodies(big_tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], bool]]:
    """(path, body, valid) - the shapes a hostile tenant mixes in."""
    chat = {"model": "m1", "messages": [{"role": "user", "content": "spend"}]}
    comp = "/v1/completions"
    return [
        (CHAT, chat, True),  # no max_tokens
        (CHAT, {**chat, "n": 3}, True),
        (comp, {"model": "m1", "prompt": ["a", "b", "c", "d"]}, True),  # a list of prompts, no max_tokens
        (CHAT, {**chat, "tools": big_tools}, True),
        (CHAT, {**chat, "max_completion_tokens": 400.0}, False),
        (CHAT, {**chat, "max_tokens": "2000"}, False),
        (CHAT, {**chat, "n": 10**9}, False),
        (CHAT, {**chat, "max_tokens": 10**12}, True),  # capped to max_output_tokens
    ]


def test_a_budget_is_never_overspent_by_missing_or_hostile_max_tokens(
        gateway_factory: Callable[..., GatewayProcess], chatty_upstream: FakeUpstream,
        redis_server: RedisServer, redis_prefix: str) -> None:
    cfg = limited(chatty_upstream.url, {"team-a": {"budget_day_usd": 1.0}}, default_max_tokens=10,
                  max_output_tokens=10)
    cfg["models"]["m1"]["prices"] = {"prompt_per_1m": 0, "completion_per_1m": 10_000}  # $0.01 per token
    gw = gateway_factory(with_redis(cfg, redis_server.url, redis_prefix))
    chatty_upstream.control(ttft_ms=1500)  # every request is admitted before any settles
    tools = [{"type": "function", "function": {"name": f"t{i}", "description": "x" * 250}} for i in range(100)]
    bodies = hostile_bodies(tools)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: (bodies[i % len(bodies)], post(gw, bodies[i % len(bodies)][1],
                                                                        path=bodies[i % len(bodies)][0])),
                                range(40)))
    served = [r for _, r in results if r.status_code == 200]
    assert served
    spent = sum(r.json()["usage"]["completion_tokens"] for r in served) * 0.01
    print(f"budget $1.00: {len(served)} served, spent ${spent:.2f}")
    assert spent <= 1.0 + 1e-9  # the reservation is an upper bound: not even one request's worth over
    for (_, _, valid), r in results:
        assert r.status_code in ((200, 429) if valid else (400,)), r.text
    client = redis_server.client()
    time.sleep(0.5)
    day = [int(client.get(k)) for k in client.scan_iter(f"{redis_prefix}{{t:team-a}}:rl:t:d:*")]
    assert day and day[0] == round(spent * 10**12) and day[0] <= 10**12  # settled to the real spend, exactly


def test_limits_hold_exactly_under_100_concurrent_hostile_requests(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis_server: RedisServer,
        redis_prefix: str) -> None:
    cfg = limited(upstream.url, {"team-a": {"rpm": 30}}, default_max_tokens=5, max_output_tokens=50)
    c = with_redis(cfg, redis_server.url, redis_prefix)
    gws = [gateway_factory(c), gateway_factory(c)]
    tools = [{"type": "function", "function": {"name": f"t{i}", "description": "x" * 250}} for i in range(100)]
    bodies = hostile_bodies(tools)
    before = upstream.counters()["requests"]

    def one(i: int) -> tuple[bool, httpx.Response]:
        path, body, valid = bodies[i % len(bodies)]
        return valid, post(gws[i % 2], body, path=path)

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    valid = [r for v, r in results if v]
    assert all(r.status_code == 400 for v, r in results if not v)
    assert [r.status_code for r in valid].count(200) == 30
    assert [r.status_code for r in valid].count(429) == len(valid) - 30
    assert upstream.counters()["requests"] - before == 30
    assert all(r.json()["usage"]["completion_tokens"] <= 50 for r in valid if r.status_code == 200)


# ------------------------------------------------------------------------------------------------ 3. windows

def test_sliding_window_is_exact_to_the_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_800_000_059.0]  # one second before a minute boundary
    monkeypatch.setattr("gateway.limit_store.time.time", lambda: clock[0])
    lim = MemoryLimits()
    scope = Scope("b", "{t:x}", Limits(rpm=3, tpm=100), "x")

    def admit(lease: str, tokens: int = 1) -> bool:
        return lim.admit([scope], Admission(lease, tokens, 0, 60_000)).ok

    assert [admit(f"a{i}") for i in range(4)] == [True, True, True, False]
    clock[0] += 2.0  # a fixed minute window would have reset here
    assert not admit("b0")
    clock[0] += 57.999  # 59.999 s after the first three: still inside their window
    assert not admit("b1")
    clock[0] += 0.001  # exactly 60 s: they leave the window
    assert [admit(f"c{i}") for i in range(4)] == [True, True, True, False]
    # tpm: a reservation reconciled at settle frees the difference at once
    clock[0] += 61
    assert admit("t1", 90) and not admit("t2", 20)
    lim.settle([scope], Settlement("t1", 90, 0, 5, 0, True, 1000))
    assert admit("t3", 20)


def test_rpm_and_tpm_hold_across_a_minute_boundary(gateway_factory: Callable[..., GatewayProcess],
                                                   upstream: FakeUpstream, redis_server: RedisServer,
                                                   redis_prefix: str) -> None:
    """Fixed minute windows let 2x the limit through around a boundary; a sliding window never more than 1x."""
    cfg = limited(upstream.url, {"team-a": {"rpm": 5}, "team-b": {"tpm": 900}})
    gw = gateway_factory(with_redis(cfg, redis_server.url, redis_prefix))
    small = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    big = {**small, "max_tokens": 300}  # uses 7 + 300 tokens; reserves its byte-bounded prompt + 300
    reserved = sum(reserve(dict(big), "chat", OutputBounds(256)))
    assert 2 * reserved <= 900 < 2 * 307 + reserved  # 2 fit; a 3rd does not, before or after they settle
    # Start 5-55 s into a minute: the burst below is on one side of the boundary, and the boundary comes
    # at most 55 s after it, so the requests just past the boundary still see every admission in the window.
    # (Started at 0.5 s past a minute, the boundary would be 59.5 s away: too late to tell the windows apart.)
    if not 5 <= time.time() % 60 <= 55:
        time.sleep((65 - time.time() % 60) % 60)
    t0 = time.time()
    assert [post(gw, small).status_code for _ in range(6)] == [200] * 5 + [429]
    assert [post(gw, big, B).status_code for _ in range(3)] == [200, 200, 429]
    t1 = time.time()  # every admission above happened in [t0, t1]
    boundary = (t0 // 60 + 1) * 60
    time.sleep(max(0.0, boundary + 0.3 - time.time()))  # a fixed window would start from 0 here
    assert time.time() - t0 < 59, "the machine is too slow for this test"
    assert post(gw, small).status_code == 429
    assert post(gw, big, B).status_code == 429
    assert int(redis_server.client().get(f"{redis_prefix}{{t:team-b}}:rl:t:tt") or 0) == 2 * 307
    time.sleep(max(0.0, t1 + 60.3 - time.time()))  # every admission above has left the window
    assert [post(gw, small).status_code for _ in range(6)] == [200] * 5 + [429]
    assert post(gw, big, B).status_code == 200


# ------------------------------------------------------------------------------------------------ 4. blips

async def test_admit_and_settle_are_idempotent_and_a_late_admit_is_void(redis_server: RedisServer,
                                                                         redis_prefix: str) -> None:
    store = RedisStore(redis_server.url, redis_prefix, 2.0, 1.0, "ledger", None, lambda op, e: None)
    tag = redis_prefix + "{t:y}"
    scope = Scope(tag + ":rl:t", tag, Limits(rpm=100, tpm=1000, concurrency=5), "y", 10**15, 0)
    c = redis_server.client()
    try:
        a = Admission("L1", 40, 1000, 60_000)
        assert (await store.admit([scope], a)).ok
        again = await store.admit([scope], a)  # a retried command: counted once
        assert again.ok and again.repeated
        assert c.zcard(tag + ":rl:t:rq") == 1 and int(c.get(tag + ":rl:t:tt")) == 40 and c.zcard(tag + ":rl:t:c") == 1
        st = Settlement("L1", 40, 1000, 12, 300, True, 60_000)
        await store.settle([scope], st)
        await store.settle([scope], st)  # a settle whose reply was lost, retried: applied once
        assert int(c.get(tag + ":rl:t:tt")) == 12 and c.zcard(tag + ":rl:t:c") == 0
        assert [int(c.get(k)) for k in c.scan_iter(tag + ":rl:t:d:*")] == [300]
        # the settle of a request whose admit Redis had not run yet (queued during a stall) comes first:
        late = Admission("L2", 40, 1000, 60_000)
        await store.settle([scope], Settlement("L2", 40, 1000, 10, 200, True, 60_000))
        r = await store.admit([scope], late)
        assert r.repeated and not r.ok  # void: nothing reserved, no lease left behind
        assert c.zcard(tag + ":rl:t:c") == 0 and int(c.get(tag + ":rl:t:tt")) == 22
        assert [int(c.get(k)) for k in c.scan_iter(tag + ":rl:t:d:*")] == [500]  # its real usage counted once
        # every key of the tenant is in one Cluster slot
        assert len({key_slot(k) for k in c.scan_iter(tag + "*")}) == 1
    finally:
        await store.close()


@pytest.fixture
def stallable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(None, ("--enable-debug-command", "local"))
    yield server
    server.kill()


@pytest.mark.parametrize("stall", ["debug_sleep", "client_pause"])
def test_full_concurrency_is_back_within_1s_of_a_redis_stall(
        stall: str, stallable_redis: RedisServer, gateway_factory: Callable[..., GatewayProcess],
        reset_upstream: FakeUpstream, redis_prefix: str) -> None:
    cfg = limited(reset_upstream.url, {"team-a": {"concurrency": 3}})
    gw = gateway_factory(with_redis(cfg, stallable_redis.url, redis_prefix, timeout_s=0.25, down_for_s=1.0))
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    leases = f"{redis_prefix}{{t:team-a}}:rl:t:c"
    client = stallable_redis.client()
    reset_upstream.control(ttft_ms=1200)
    pool = concurrent.futures.ThreadPoolExecutor(8)
    first = [pool.submit(post, gw, body) for _ in range(3)]  # admitted, in flight when Redis stalls
    deadline = time.monotonic() + 5
    while client.zcard(leases) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.zcard(leases) == 3
    stalled = threading.Event()

    def do_stall() -> float:
        c = redis.Redis.from_url(stallable_redis.url, socket_timeout=10)
        if stall == "debug_sleep":
            stalled.set()
            c.execute_command("DEBUG", "SLEEP", "3")  # the whole server is blocked; queued commands run after
        else:
            c.execute_command("CLIENT", "PAUSE", "3000", "ALL")
            stalled.set()
            time.sleep(3)
        return time.monotonic()

    stall_done = pool.submit(do_stall)
    stalled.wait()
    time.sleep(0.2)
    during = [pool.submit(post, gw, body) for _ in range(3)]  # admits time out: let through (fail open)
    assert all(f.result().status_code == 200 for f in first + during)  # all finished inside the stall
    back = stall_done.result()
    while client.zcard(leases) > 0 and time.monotonic() - back < 5:
        time.sleep(0.02)
    freed_after = time.monotonic() - back
    print(f"{stall}: every lease released {freed_after:.3f}s after Redis answered again")
    assert client.zcard(leases) == 0
    assert freed_after <= 1.0, f"leases held {freed_after:.2f}s after Redis answered again"
    reset_upstream.control(ttft_ms=800)
    burst = [pool.submit(post, gw, body) for _ in range(5)]
    codes = sorted(f.result().status_code for f in burst)
    pool.shutdown()
    assert codes == [200, 200, 200, 429, 429]  # the tenant's full concurrency, and no more
    markers = [k for k in client.scan_iter(f"{redis_prefix}{{t:team-a}}:rl:q:*") if client.hget(k, "s") == b"a"]
    assert markers == []  # no admission is left unsettled



class ReplyLostStore(RedisStore):
    """Redis runs the admit, the reply never arrives (a fault real Redis cannot produce on demand)."""

    async def admit(self, scopes: Any, a: Admission) -> Any:
        await super().admit(scopes, a)
        await asyncio.sleep(3600)


async def test_a_request_cancelled_mid_admit_leaves_no_lease(redis_server: RedisServer, redis_prefix: str) -> None:
    """The client leaving cancels the request inside admit, after Redis ran it: the lease is given back."""
    cfg = parse_config(f"""
models: {{m1: {{deployments: [{{url: "http://127.0.0.1:1", model: m1}}], prices: {{completion_per_1m: 1}}}}}}
redis: {{url: "{redis_server.url}", key_prefix: "{redis_prefix}"}}
tenants: {{anonymous: {{limits: {{concurrency: 2, budget_day_usd: 1}}}}}}
""", "test")
    store = ReplyLostStore(redis_server.url, redis_prefix, 2.0, 1.0, "ledger", None, lambda op, e: None)
    lim = StoreLimiter(cfg, store, lambda t, p, v: None)
    rec = RequestRecord("r1", "chat", tenant="anonymous")
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    task = asyncio.create_task(lim.admit(rec, cfg.models["m1"], body))
    leases = f"{redis_prefix}{{t:anonymous}}:rl:t:c"
    c = redis_server.client()
    while c.zcard(leases) == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await lim.close()
    await store.close()
    assert c.zcard(leases) == 0
    assert [int(c.get(k)) for k in c.scan_iter(f"{redis_prefix}{{t:anonymous}}:rl:t:d:*")] == [0]


@pytest.mark.vllm
def test_real_vllm_honours_the_bound_the_gateway_sets(vllm: dict[str, str],
                                                      gateway_factory: Callable[..., GatewayProcess]) -> None:
    """vLLM itself stops at the bound written into the body: chat (max_tokens / max_completion_tokens) and
    completions with n and a list of prompts, none of which named a bound the gateway did not cap."""
    cfg = stack_config(vllm["chat"], vllm["embed"])
    cfg["limits"] = {"default_max_tokens": 4, "max_output_tokens": 6}
    gw = gateway_factory(cfg)
    story = [{"role": "user", "content": "Write a very long story about a dragon, at least 500 words."}]
    r = post(gw, {"model": "smollm2", "messages": story, "temperature": 0}, {})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4 and r.json()["choices"][0]["finish_reason"] == "length"
    r = post(gw, {"model": "smollm2", "messages": story, "temperature": 0, "max_completion_tokens": 500}, {})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6  # capped, and vLLM obeyed
    r = post(gw, {"model": "smollm2", "prompt": ["Once upon a time", "The dragon said"], "n": 2,
                  "temperature": 0.8, "seed": 1}, {}, path="/v1/completions")
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4 and all(c["finish_reason"] == "length" for c in choices)
    assert r.json()["usage"]["completion_tokens"] == 4 * 2 * 2  # each of 2 prompts x n=2 stopped at 4

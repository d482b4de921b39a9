"""Priority classes, the fair queue and admission by TTFT objective, against the test upstream (real HTTP)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import FairQueueSpec, parse_config
from gateway.fair_queue import FairQueue, Ticket
from gateway.routing.live import DeploymentLive
from tests.conftest import FakeUpstream, GatewayProcess, metric_value, start_fake_upstream

KEY_A, KEY_B, KEY_I = "sk-flood-a", "sk-steady-b", "sk-interactive"
KEYS = [{"tenant": "flood", "key": KEY_A}, {"tenant": "steady", "key": KEY_B},
        {"tenant": "steady", "key": KEY_I, "priority_class": "interactive"}]


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    f = start_fake_upstream(["m1"])
    yield f
    f.kill()


@pytest.fixture(scope="module")
def up2() -> Iterator[FakeUpstream]:
    f = start_fake_upstream(["m2"])
    yield f
    f.kill()


@pytest.fixture(autouse=True)
def normal(up: FakeUpstream, up2: FakeUpstream) -> Iterator[None]:
    for f in (up, up2):
        f.control(ttft_ms=0, itl_ms=0, num_waiting=0, kv_cache_usage=0, reset_counters=True)
    yield


def config(url: str, url2: str | None = None, classes: dict[str, Any] | None = None, **dep: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth": {"keys": KEYS},
        "tenants": {"flood": {"priority_class": "batch"}, "steady": {"priority_class": "standard"}},
        "models": {"m1": {"deployments": [{"name": "m1-a", "url": url, "model": "m1", **dep}]}},
        "metrics_scrape_interval": 0.2,
    }
    if classes is not None:
        cfg["priority_classes"] = classes
    if url2 is not None:
        cfg["models"]["m2"] = {"deployments": [{"name": "m2-a", "url": url2, "model": "m2"}]}
        cfg["routes"] = {"assistant": {"candidates": ["m1", "m2"]}}
    return cfg


def chat(gw: GatewayProcess, key: str, model: str = "m1", stream: bool = False, max_tokens: int = 4,
         content: str = "hello there", headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream, **extra}
    return httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps(body), timeout=120,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}",
                               **(headers or {})})


# ------------------------------------------------------------------ priority classes


def test_priority_sent_from_the_class_and_never_raised(gateway_factory: Callable[..., GatewayProcess],
                                                        up: FakeUpstream) -> None:
    gw = gateway_factory(config(up.url, priority_scheduling=True))

    def sent(key: str, **kw: Any) -> Any:
        r = chat(gw, key, **kw)
        assert r.status_code == 200, r.text
        return up.counters()["last_request"].get("priority", "absent")

    assert sent(KEY_A) == 20  # tenant flood: batch
    assert sent(KEY_B) == 10  # tenant steady: standard
    assert sent(KEY_I) == 0  # the key's own class: interactive
    assert sent(KEY_A, priority=-100) == 20  # asking for more than the class: ignored
    assert sent(KEY_A, headers={"x-gateway-priority-class": "interactive"}) == 20  # so is a higher class
    assert sent(KEY_I, priority=15) == 15  # lowering by number
    assert sent(KEY_I, headers={"x-gateway-priority-class": "batch"}) == 20  # lowering by class
    r = chat(gw, KEY_A, headers={"x-gateway-priority-class": "urgent"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-gateway-priority-class"
    r = chat(gw, KEY_A, priority="high")
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    rec = gw.record(chat(gw, KEY_I, headers={"X-Request-Id": "prio-rec"}).headers["x-request-id"])
    assert rec["priority_class"] == "interactive" and rec["priority"] == 0
    # vLLM's /v1/messages schema has no `priority`: none is sent there
    r = httpx.post(gw.url + "/v1/messages", timeout=120, headers={"Authorization": f"Bearer {KEY_A}"},
                   json={"model": "m1", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert "priority" not in up.counters()["last_request"]


def test_priority_not_sent_without_the_policy(gateway_factory: Callable[..., GatewayProcess],
                                              up: FakeUpstream) -> None:
    gw = gateway_factory(config(up.url))  # priority_scheduling off: the field is never sent
    for kw in ({}, {"priority": 5}, {"priority": -5}):
        r = chat(gw, KEY_A, **kw)
        assert r.status_code == 200, r.text
        assert "priority" not in up.counters()["last_request"]


def test_a_class_that_does_not_exist_is_a_config_error() -> None:
    from gateway.config import ConfigError

    cfg = config("http://127.0.0.1:1")
    cfg["tenants"]["flood"]["priority_class"] = "bulk"
    with pytest.raises(ConfigError, match="'bulk' is not one of priority_classes"):
        parse_config(orjson.dumps(cfg).decode(), "t.yaml")


# ------------------------------------------------------------------ the fair queue (in process)


def _queue(limit: int = 1, **spec: Any) -> tuple[FairQueue, list[float]]:
    now = [0.0]
    q = FairQueue("d", limit, FairQueueSpec(**spec), lambda t: 2.0 if t == "heavy" else 1.0,
                  clock=lambda: now[0])
    return q, now


def test_release_order_is_by_band_then_served_share_not_arrival() -> None:
    async def main() -> list[str]:
        q, _ = _queue()
        order: list[str] = []
        first = Ticket("a", 20, 1000)
        await q.acquire(first)  # the only slot; everyone else waits
        tickets = [Ticket("a", 20, 1000) for _ in range(3)] + [Ticket("b", 20, 100) for _ in range(2)] + \
            [Ticket("c", 0, 100)]

        async def one(t: Ticket) -> None:
            await q.acquire(t)
            order.append(t.tenant)
            await asyncio.sleep(0)
            q.release(t, None)

        tasks = []
        for t in tickets:
            tasks.append(asyncio.create_task(one(t)))
            await asyncio.sleep(0)  # arrival order: a, a, a, b, b, c
        assert q.queued() == 6
        q.release(first, None)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(main())
    # c's band (priority 0) first; then b, which has been served 100 tokens against a's 1000+, until b's
    # share passes a's; a's own requests in arrival order.
    assert order == ["c", "b", "b", "a", "a", "a"]


def test_weights_and_decay() -> None:
    q, now = _queue(window_s=10)
    q._charge("heavy", 1000)
    q._charge("light", 600)
    assert q.share("heavy") == pytest.approx(500)  # weight 2
    assert q.share("light") == pytest.approx(600)
    now[0] = 10.0
    assert q.share("light") == pytest.approx(600 / 2.718281828, rel=1e-3)  # one time constant later
    q.correct("light", -10_000)  # a correction never drives the served tokens below zero
    assert q.share("light") == 0.0


def test_engine_bound_saturation_holds_in_flight_and_recovers() -> None:
    async def main() -> None:
        live = DeploymentLive(scraped=True)
        q, _ = _queue(limit=8, max_waiting=2)
        q.live = live
        a, b = Ticket("a", 10, 1), Ticket("a", 10, 1)
        await q.acquire(a)
        await q.acquire(b)
        live.waiting = 5  # vLLM's queue over the bound: nothing new goes while our two are in flight
        c = Ticket("b", 10, 1)
        waiting = asyncio.create_task(q.acquire(c))
        await asyncio.sleep(0.05)
        assert not c.granted and q.queued() == 1
        q.release(a, 1)  # one of ours finished: its slot is reused, in flight stays at 2
        await asyncio.wait_for(waiting, 2)
        assert c.granted and q.in_flight == 2
        d = Ticket("b", 10, 1)
        waiting = asyncio.create_task(q.acquire(d))
        await asyncio.sleep(0.05)
        assert not d.granted
        live.waiting = 0  # the next scrape says the engine caught up: released within a re-check
        await asyncio.wait_for(waiting, 2)
        assert q.in_flight == 3

    asyncio.run(main())


def test_priority_slots_let_a_better_band_past_lower_priority_work() -> None:
    async def main() -> None:
        q, _ = _queue(limit=1, priority_slots=1)
        batch = Ticket("a", 20, 1)
        assert await q.acquire(batch) is False
        assert q.may_start(0) and not q.may_start(20)  # only a better priority than one in flight
        urgent = Ticket("b", 0, 1)
        assert await q.acquire(urgent) is False  # the extra slot, at once
        late = [Ticket("b", 0, 1), Ticket("a", 20, 1)]
        waiting = [asyncio.create_task(q.acquire(t)) for t in late]
        await asyncio.sleep(0.05)
        assert q.in_flight == 2 and q.queued() == 2  # the extra slot is taken: both wait
        q.release(batch, None)  # the urgent one now holds the only real slot, and nothing in flight is worse
        await asyncio.sleep(0.05)
        assert not late[0].granted and not late[1].granted
        q.release(urgent, None)
        await asyncio.sleep(0.05)
        assert late[0].granted and not late[1].granted  # the band first; the batch one waits for a real slot
        q.release(late[0], None)
        await asyncio.wait_for(asyncio.gather(*waiting), 2)
        assert late[1].granted and q.in_flight == 1 and q.priorities == {20: 1}

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        q, _ = _queue()
        held = Ticket("a", 10, 1)
        await q.acquire(held)
        t = Ticket("b", 10, 1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await q.acquire(t)
        assert q.queued() == 0 and q.in_flight == 1
        q.release(held, None)
        assert q.in_flight == 0

    asyncio.run(main())


# ------------------------------------------------------------------ the fair queue through the gateway


def test_gateway_releases_the_light_tenant_first_and_counts_queue_time(
        gateway_factory: Callable[..., GatewayProcess], up: FakeUpstream) -> None:
    gw = gateway_factory(config(up.url, max_concurrency=1, fair_queue={"window_s": 60}))
    up.control(ttft_ms=600)  # the flood takes >= 3 s in all; first come, first served would answer steady last
    long_prompt = "word " * 400
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(chat, gw, KEY_A, content=long_prompt, headers={"X-Request-Id": f"flood-{i}"})
                  for i in range(5)]
        time.sleep(0.4)  # the flood holds the slot and queues
        steady = pool.submit(chat, gw, KEY_B, headers={"X-Request-Id": "steady-0"})
        results = [f.result() for f in floods] + [steady.result()]
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    recs = {r["request_id"]: r for r in gw.records()}
    ends = sorted(recs, key=lambda k: recs[k]["ts"] + recs[k]["e2e_ms"] / 1e3)
    # The steady tenant arrived behind queued flood requests and was released next (it had no served tokens):
    # only the flood requests sent before it arrived (one, or two on a slow machine) end earlier.
    assert ends.index("steady-0") <= 2 or ends[-2:] == ["flood-3", "flood-4"], ends
    assert ends.index("steady-0") < 5 - 1, ends
    assert recs["steady-0"]["queue_ms"] < 1000 < max(recs[f"flood-{i}"]["queue_ms"] for i in range(5))
    text = gw.metrics()
    assert metric_value(text, "gateway_tenant_queue_seconds_count", deployment="m1-a", tenant="flood") == 5
    assert metric_value(text, "gateway_tenant_queue_seconds_count", deployment="m1-a", tenant="steady") == 1
    assert metric_value(text, "gateway_tenant_queue_seconds_sum", deployment="m1-a", tenant="flood") > 1.0
    assert metric_value(text, "gateway_fair_queue_waiting", deployment="m1-a") == 0


# ------------------------------------------------------------------ admission by TTFT objective

SLO_CLASSES = {"interactive": {"priority": 0, "ttft_slo_ms": 250},
               "standard": {"priority": 10}, "batch": {"priority": 20}}


def test_slo_refusal_with_retry_after_then_a_probe(gateway_factory: Callable[..., GatewayProcess],
                                                   up: FakeUpstream) -> None:
    gw = gateway_factory(config(up.url, classes=SLO_CLASSES, fair_queue={}))
    up.control(ttft_ms=600)
    first = chat(gw, KEY_I, stream=True)  # no figures yet: admitted (cold start), and the predictor learns
    assert first.status_code == 200
    r = chat(gw, KEY_I, stream=True, headers={"X-Request-Id": "slo-refused"})
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "slo_unattainable" and err["param"] == "ttft_slo" and "'interactive'" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 2
    rec = gw.record("slo-refused")
    assert rec["slo_result"] == "refused" and rec["limited_by"] == "slo" and rec["slo_predicted_ms"] > 500
    assert chat(gw, KEY_B, stream=True).status_code == 200  # a class without an objective is not judged
    up.control(ttft_ms=0)
    time.sleep(float(r.headers["retry-after"]) + 0.2)  # honoured: the stale prediction admits a probe
    ok = chat(gw, KEY_I, stream=True, headers={"X-Request-Id": "slo-probe"})
    assert ok.status_code == 200
    probe = gw.record("slo-probe")
    assert probe["slo_result"] == "met" and probe["slo_predicted_ms"] > 500
    text = gw.metrics()
    assert metric_value(text, "gateway_slo_requests_total", priority_class="interactive", result="refused") == 1
    assert metric_value(text, "gateway_slo_requests_total", priority_class="interactive", result="met") == 1
    # predictions were made for the probe only (the first request was admitted without figures)
    assert metric_value(text, "gateway_slo_prediction_error_seconds_count", priority_class="interactive") == 1
    assert metric_value(text, "gateway_slo_prediction_error_seconds_sum", priority_class="interactive") > 0.4
    assert metric_value(text, "gateway_ratelimit_refusals_total", tenant="steady", limit="slo") == 1


def test_slo_miss_moves_to_the_fallback_model(gateway_factory: Callable[..., GatewayProcess], up: FakeUpstream,
                                              up2: FakeUpstream) -> None:
    classes = {**SLO_CLASSES, "interactive": {"priority": 0, "ttft_slo_ms": 250, "on_slo_miss": "fallback"}}
    gw = gateway_factory(config(up.url, up2.url, classes=classes))
    up.control(ttft_ms=600)
    assert chat(gw, KEY_I, model="assistant", stream=True).status_code == 200  # m1 learnt slow
    r = chat(gw, KEY_I, model="assistant", stream=True, headers={"X-Request-Id": "slo-fb"})
    assert r.status_code == 200 and r.headers["x-gateway-model"] == "m2"
    rec = gw.record("slo-fb")
    assert rec["rule"] == "slo" and rec["slo_result"] == "fallback"

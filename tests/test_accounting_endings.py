"""Every way a request can end is its own outcome, billed exactly what the upstream did (fast, fake upstream).

The fake upstream counts like vLLM (a prompt once per choice, at its first output; tokens as written), so
the gateway's served + fan-out + wasted tokens must equal the fake's counters exactly. The same endings
against REAL vLLM are in tests/test_accounting_vllm.py.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import CircuitBreakerSpec
from gateway.routing.breaker import BreakerState, CircuitBreaker
from tests.conftest import FakeUpstream, GatewayProcess, metric_value, simple_config, stop


def counters(f: FakeUpstream) -> tuple[int, int]:
    c = f.counters()
    return c["prompt_tokens"], c["generation_tokens"]


def vllm_side(rec: dict[str, Any]) -> tuple[int, int]:
    """What the gateway says vLLM did for this request: served + fan-out + wasted."""
    return (rec["prompt_tokens"] + rec["fanout_prompt_tokens"] + rec["wasted_prompt_tokens"],
            rec["completion_tokens"] + rec["wasted_completion_tokens"])


def settle(f: FakeUpstream, before: tuple[int, int]) -> tuple[int, int]:
    """The fake's counters once they stop moving (it notices a closed connection at its next write)."""
    after, deadline = counters(f), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = counters(f)
        if again == after:
            break
        after = again
    return after[0] - before[0], after[1] - before[1]


def stream_lines(gw: GatewayProcess, body: dict[str, Any], rid: str, path: str = "/v1/chat/completions",
                 stop_after: int | None = None) -> list[str]:
    lines = []
    with httpx.stream("POST", gw.url + path, json=body, timeout=30, headers={"X-Request-Id": rid}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lines.append(line)
                if stop_after is not None and len(lines) >= stop_after:
                    break  # leaving: closing the response drops the connection
    return lines


def test_n4_stream_upstream_dies_is_billed_per_choice(fake: FakeUpstream,
                                                      gateway_factory: Callable[..., GatewayProcess]) -> None:
    """n=4 and vLLM dies after 20 tokens: 20 billed, not 20/4 (the latest chunk's figure is one choice's)."""
    gw = gateway_factory(simple_config(fake.url))
    fake.control(die_after_chunks=20)
    before = counters(fake)
    body = {"model": "m1", "messages": [{"role": "user", "content": "one two three"}], "n": 4, "max_tokens": 50,
            "stream": True}
    lines = stream_lines(gw, body, "n4-dies")
    assert '"upstream_stream_broken"' in lines[-1]  # an honest error event, not a fake finish
    rec = gw.record("n4-dies")
    assert rec["outcome"] == "upstream_failed_midstream"
    assert rec["completion_tokens"] == 20
    assert rec["fanout_prompt_tokens"] == 3 * rec["prompt_tokens"] > 0
    assert vllm_side(rec) == settle(fake, before)


def test_prompt_list_stream_client_leaves_is_billed_per_prompt(
        fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(simple_config(fake.url))
    fake.control(itl_ms=20)
    before = counters(fake)
    body = {"model": "m1", "prompt": ["a b c", "d e", "f g h i j"], "max_tokens": 40, "stream": True}
    stream_lines(gw, body, "three-prompts", "/v1/completions", stop_after=10)
    rec = gw.record("three-prompts")
    assert rec["outcome"] == "client_left_midstream" and rec["status"] == 499
    assert rec["prompt_tokens"] == 4 + 3 + 6  # each prompt once (a prompt is its words + 1 in the fake)
    assert rec["completion_tokens"] >= 10
    assert vllm_side(rec) == settle(fake, before)


def test_n_greater_than_one_non_stream_counts_fanout(fake: FakeUpstream,
                                                     gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(simple_config(fake.url))
    before = counters(fake)
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, headers={"X-Request-Id": "n3"},
                   json={"model": "m1", "messages": [{"role": "user", "content": "x y"}], "n": 3, "max_tokens": 4})
    assert r.status_code == 200
    rec = gw.record("n3")
    assert rec["completion_tokens"] == 12 and rec["fanout_prompt_tokens"] == 2 * rec["prompt_tokens"]
    assert r.headers["x-gateway-fanout-prompt-tokens"] == str(rec["fanout_prompt_tokens"])
    assert vllm_side(rec) == settle(fake, before)
    assert metric_value(gw.metrics(), "gateway_fanout_prompt_tokens_total", model="m1") == rec["fanout_prompt_tokens"]


def test_client_leaving_before_the_first_token_frees_the_slot_at_once(
        fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    """The watcher runs from the request's first byte: the slot is freed and vLLM stops before any token."""
    gw = gateway_factory(simple_config(fake.url, max_concurrency=1))
    fake.control(ttft_ms=3000)
    before = counters(fake)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", timeout=0.5, headers={"X-Request-Id": "gone-early"},
                   json={"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    rec = gw.record("gone-early", timeout=2)
    assert rec["outcome"] == "client_left_before_response" and rec["status"] == 499
    assert rec["e2e_ms"] < 1500  # recorded when the client left, not when the first token came
    fake.control(ttft_ms=0)
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=5, headers={"X-Request-Id": "next"},
                   json={"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert float(r.headers["x-gateway-queue-ms"]) < 200  # the slot was free
    time.sleep(3)  # past the fake's 3 s "prefill": it must have seen the abort and counted nothing
    d = settle(fake, before)
    nxt = gw.record("next")
    assert d == (nxt["prompt_tokens"], nxt["completion_tokens"])


def test_slow_reader_that_leaves_is_its_own_outcome_and_billed_what_vllm_did(
        fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(simple_config(fake.url))
    before = counters(fake)
    # ~25 MB of chunks: more than every buffer between the fake, the gateway and this client holds
    body = orjson.dumps({"model": "m1", "prompt": "p", "n": 64, "max_tokens": 1800, "stream": True})
    host, port = gw.url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly: tiny window
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Request-Id: slow-reader\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert b"200 OK" in s.recv(1024)
    # Not reading: the gateway's writes block, then its reads, then the upstream's writes. Leave once
    # the back-pressure has reached the upstream (its counter stops), however slow the machine is.
    last, deadline = -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = fake.counters()["generation_tokens"]
        if now == last:
            break
        last = now
    s.close()
    rec = gw.record("slow-reader", timeout=10)
    assert rec["outcome"] == "client_left_slow_reader", rec
    assert rec["client_wait_ms"] > 50
    assert vllm_side(rec) == settle(fake, before)


def test_first_token_timeout_fallback_counts_the_abandoned_attempt_as_waste(
        fake: FakeUpstream, fake_b: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    cfg = simple_config(fake.url, timeouts={"connect": 1, "first_token": 0.3, "total": 10})
    cfg["models"]["m1"]["deployments"].append({"name": "m1-b", "url": fake_b.url, "model": "m1"})
    gw = gateway_factory(cfg)
    fake.control(stall_after_chunks=0)  # prefill done (role chunk sent, prompt counted), then no token
    before_a, before_b = counters(fake), counters(fake_b)
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=10, headers={"X-Request-Id": "fell-back"},
                   json={"model": "m1", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 5,
                         "stream": True})
    assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "m1-b"
    rec = gw.record("fell-back")
    assert rec["outcome"] == "ok"
    first = rec["attempts"][0]
    assert first["outcome"] == "first_token_timeout" and first["usage"] == "reported"
    assert rec["wasted_prompt_tokens"] == first["prompt_tokens"] > 0
    assert rec["wasted_cost_pico_usd"] == first["prompt_tokens"] * 1_000_000  # $1/1M prompt price
    da, db = settle(fake, before_a), settle(fake_b, before_b)
    assert (rec["wasted_prompt_tokens"], rec["wasted_completion_tokens"]) == da
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == db
    text = gw.metrics()
    assert metric_value(text, "gateway_wasted_prompt_tokens_total", reason="first_token_timeout") == da[0]


def test_error_event_before_the_first_token_falls_back(
        fake: FakeUpstream, fake_b: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    cfg = simple_config(fake.url)
    cfg["models"]["m1"]["deployments"].append({"name": "m1-b", "url": fake_b.url, "model": "m1"})
    gw = gateway_factory(cfg)
    fake.control(error_event_after_chunks=0)
    lines = stream_lines(gw, {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                              "stream": True}, "error-event")
    assert not any('"error"' in ln for ln in lines)
    rec = gw.record("error-event")
    assert rec["deployment"] == "m1-b" and rec["attempts"][0]["outcome"] == "upstream_error_event"


def test_queue_time_is_not_upstream_time(fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(simple_config(fake.url, max_concurrency=1))
    fake.control(ttft_ms=800)

    def one(i: int) -> dict[str, Any]:
        time.sleep(0.1 * i)
        httpx.post(gw.url + "/v1/chat/completions", timeout=10, headers={"X-Request-Id": f"q{i}"},
                   json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        return gw.record(f"q{i}")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, second = pool.map(one, range(2))
    assert second["queue_ms"] > 500
    assert 700 < second["upstream_ms"] < 1300, second  # its own call only, not the wait before it
    assert second["overhead_ms"] < 100


def test_gpu_time_costs_add_up_to_price_times_busy_time(
        fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    """N overlapping requests on a GPU-billed deployment ($1/s): their costs add up to the busy time."""
    cfg = simple_config(fake.url)
    del cfg["models"]["m1"]["prices"]
    cfg["models"]["m1"]["cost_basis"] = {"gpu_usd_per_hour": 3600}
    gw = gateway_factory(cfg)
    fake.control(reset_counters=True)

    def one(i: int) -> float:
        time.sleep(0.3 * i)  # staggered: 1, 2, 3, 3, 2, 1 in flight over time
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                       json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        return float(r.headers["x-gateway-cost-usd"])

    fake.control(ttft_ms=700)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        costs = list(pool.map(one, range(4)))
    busy = fake.counters()["busy_s"]
    assert busy > 1.0
    # The gateway's busy clock runs from sending a request to reading its last byte, so it holds the
    # upstream's own busy time plus the network and event-loop delay at the two ends of the busy period:
    # within 1 % on an idle machine, up to a few hundred ms on a loaded one. Without the sharing the costs
    # would add up to every request's whole time (4 x ~0.7 s = ~2.8 s against ~1.6 s busy).
    assert busy * 0.99 <= sum(costs) <= busy + 0.4, (sum(costs), busy)
    assert len(set(costs)) > 1  # overlapping requests share, they are not charged alike


@pytest.mark.parametrize("field, value", [("stream", "false"), ("max_tokens", 400.0), ("n", "8"),
                                          ("max_tokens", "2000"), ("n", 2.0), ("stream", 0)])
def test_types_that_change_the_bill_are_strict(gateway: GatewayProcess, field: str, value: object) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], field: value}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                   headers={"Authorization": "Bearer sk-test-tenant-a"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_breaker_probe_that_never_reached_the_upstream_gives_its_slot_back() -> None:
    now = [0.0]
    b = CircuitBreaker("d", CircuitBreakerSpec(failures=1, cooldown_s=1), clock=lambda: now[0])
    b.record(False)
    assert b.state is BreakerState.OPEN
    now[0] = 2.0
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # the one probe is out
    b.settle(None)  # ...and never reached the deployment (e.g. the body could not be serialised)
    assert b.allow()  # so the next request may probe
    b.settle(True)
    assert b.state is BreakerState.CLOSED


def test_gateway_queue_timeouts_do_not_open_the_breaker(
        fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    cfg = simple_config(fake.url, max_concurrency=1)
    cfg["server"] = {"queue_timeout": 0.1}
    cfg["circuit_breaker"] = {"failures": 2}
    gw = gateway_factory(cfg)
    fake.control(ttft_ms=1500)
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(lambda _: httpx.post(gw.url + "/v1/chat/completions", json=body,
                                                    timeout=10).status_code, range(5)))
    assert codes.count(200) == 1 and codes.count(503) == 4
    assert metric_value(gw.metrics(), "gateway_circuit_breaker_state", deployment="m1-a") == 0
    fake.control(ttft_ms=0)
    assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200


def test_connect_timeout_on_a_non_stream_request_falls_back(
        fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    """A deployment whose accept queue is full times out on connect: the request moves on (no 504)."""
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    port = black_hole.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped, connect hangs
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.2)
    try:
        cfg = simple_config(f"http://127.0.0.1:{port}", timeouts={"connect": 0.3, "first_token": 5, "total": 10})
        cfg["models"]["m1"]["deployments"].append({"name": "m1-b", "url": fake.url, "model": "m1"})
        fake.control(healthy=False)  # both look unhealthy: the black hole keeps its place in the order
        gw = gateway_factory(cfg)
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10, headers={"X-Request-Id": "ct"},
                       json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        rec = gw.record("ct")
        assert rec["deployment"] == "m1-b"
        assert rec["attempts"][0]["outcome"] in ("connect_timeout", "connect_error")
        assert str(port) not in r.text
    finally:
        for c in fillers:
            c.close()
        black_hole.close()


def test_shutdown_mid_stream_is_recorded(fake: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    cfg = simple_config(fake.url)
    cfg["server"] = {"shutdown_grace_s": 0.5}
    gw = gateway_factory(cfg)
    fake.control(itl_ms=50)
    before = counters(fake)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30, headers={"X-Request-Id": "shut"},
                      json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 10:
                stop(gw.proc)  # SIGTERM: uvicorn cancels what is still running after its grace period
                break
    recs = [x for x in gw.records() if x["request_id"] == "shut"]
    assert len(recs) == 1
    assert recs[0]["outcome"] in ("gateway_shutdown", "client_left_midstream")
    assert vllm_side(recs[0]) == settle(fake, before)

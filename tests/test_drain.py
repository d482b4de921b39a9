"""SIGTERM with a drain notice (server.drain_notice_s), on one `gateway serve` process without a load balancer.

What an orchestrator's health check sees: /readyz 503 at once (in every worker), /healthz still 200, new
requests still served during the notice but with `connection: close`, then the listener closes, a stream
that was running finishes with all its tokens, and the process exits. Without a notice SIGTERM closes the
listener at once, as before. HAProxy in front of replicas: tests/test_scaleout.py.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import FakeUpstream, GatewayProcess, simple_config

NOTICE_S = 3.0


def stream_tokens(url: str, n: int, out: list[Any]) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": n, "stream": True,
            "stream_options": {"include_usage": True}}
    got, usage = 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                got += bool(event["choices"] and event["choices"][0]["delta"].get("content"))
                usage = event.get("usage") or usage
    out.append((r.status_code, got, usage and usage["completion_tokens"]))


def not_serving(url: str) -> bool:
    """Nothing accepts new requests: refused (one worker), or, with several, left in the listen backlog of
    the socket uvicorn's supervisor still holds (no answer, then a reset when it exits)."""
    try:
        httpx.get(url + "/healthz", timeout=0.5)
    except httpx.TransportError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_notice_says_unready_then_stops_and_finishes_streams(
        workers: int, reset_upstream: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> None:
    cfg = simple_config(reset_upstream.url)
    cfg["server"] = {"drain_notice_s": NOTICE_S, "shutdown_grace_s": 30}
    gw = gateway_factory(cfg, workers=workers)
    deadline = time.monotonic() + 20
    while httpx.get(gw.url + "/readyz", timeout=5).status_code != 200:  # the first health check of the upstream
        assert time.monotonic() < deadline
        time.sleep(0.1)
    reset_upstream.control(itl_ms=100)  # 60 tokens: ~6 s, past the notice
    results: list[Any] = []
    streams = [threading.Thread(target=stream_tokens, args=(gw.url, 60, results)) for _ in range(2)]
    for t in streams:
        t.start()
    time.sleep(0.8)
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    # every worker gets the signal (uvicorn's supervisor passes it on within ~0.5 s): then /readyz on new
    # connections, spread over the workers, all say draining
    deadline = time.monotonic() + 1.5
    while httpx.get(gw.url + "/readyz", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
        time.sleep(0.05)
    time.sleep(0.2)
    ready = [httpx.get(gw.url + "/readyz", timeout=5) for _ in range(6)]
    assert [r.status_code for r in ready] == [503] * 6 and all(r.json()["draining"] for r in ready)
    assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200  # alive: not a liveness failure
    during = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                        json={"model": "m1", "messages": [{"role": "user", "content": "y"}], "max_tokens": 2})
    assert during.status_code == 200 and during.headers["connection"] == "close"
    assert time.monotonic() - t0 < NOTICE_S, "the checks above took longer than the notice: raise NOTICE_S"
    deadline = time.monotonic() + 10
    while not not_serving(gw.url):
        assert time.monotonic() < deadline, "still serving long after the notice"
        time.sleep(0.05)
    closed_after = time.monotonic() - t0
    for t in streams:
        t.join(60)
    code = gw.proc.wait(30)
    exited_after = time.monotonic() - t0
    reset_upstream.control(itl_ms=0)
    assert results == [(200, 60, 60)] * 2, results
    assert code in (0, -signal.SIGTERM)
    assert NOTICE_S - 0.1 < closed_after < NOTICE_S + 3, closed_after
    assert exited_after >= 4.5  # it waited for the streams (~6 s from their start, 0.8 s before SIGTERM)


def test_sigterm_without_notice_stops_accepting_at_once(reset_upstream: FakeUpstream,
                                                        gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(simple_config(reset_upstream.url))  # drain_notice_s: 0, the default
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not not_serving(gw.url):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert time.monotonic() - t0 < 1.5
    assert gw.proc.wait(30) in (0, -signal.SIGTERM)

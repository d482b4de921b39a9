"""Hostile request shapes: each is refused or timed out cleanly, memory stays bounded, neighbours keep their latency."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from tests.conftest import FakeUpstream, GatewayProcess, metric_value, simple_config

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def gw(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream) -> GatewayProcess:
    return gateway_factory({**simple_config(upstream.url),
                            "server": {"body_timeout": 2, "max_body_bytes": 1024 * 1024, "request_log": "off"}})


def rss_mib(gw: GatewayProcess) -> float:
    return metric_value(gw.metrics(), "process_resident_memory_bytes") / 2**20


def normal_latency_ms(gw: GatewayProcess, n: int = 20) -> float:
    with httpx.Client(timeout=10) as c:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def status_of(gw: GatewayProcess, content: bytes, timeout: float = 30) -> tuple[int, dict[str, object]]:
    r = httpx.post(gw.url + "/v1/chat/completions", content=content, timeout=timeout,
                   headers={"Content-Type": "application/json"})
    return r.status_code, r.json()


def test_huge_nested_and_oversized_bodies(gw: GatewayProcess) -> None:
    before = rss_mib(gw)
    status, body = status_of(gw, b"x" * (30 * 1024 * 1024))  # 30 MB
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = status_of(gw, b"[" * 100_000 + b"]" * 100_000)  # nesting far past any parser's limit
    assert status in (400, 413) and "error" in body
    status, body = status_of(gw, orjson.dumps({"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}))
    assert status == 400
    assert rss_mib(gw) - before < 100, "a refused body must not stay in memory"


def test_many_messages_and_absurd_numbers(gw: GatewayProcess) -> None:
    many = {**CHAT, "messages": [{"role": "user", "content": "x"}] * 100_000}
    status, body = status_of(gw, orjson.dumps(many))
    assert status in (400, 413), body  # the upstream's context window (or the body limit) refuses it
    status, body = status_of(gw, orjson.dumps({**CHAT, "max_tokens": 10**12}))
    assert status == 400 and "maximum context length" in body["error"]["message"]
    for bad in (b'{"model":"m1","messages":[{"role":"user","content":"x"}],"temperature":-1}',
                b'{"model":"m1","messages":[{"role":"user","content":"x"}],"top_p":NaN}',
                b'{"model":"m1","messages":[{"role":"user","content":"x"}],"n":1e309}'):
        status, body = status_of(gw, bad)
        assert status == 400, body


def slow_sender(port: int, stop: threading.Event, results: list[bytes]) -> None:
    """Sends a request body one byte a second (a slowloris) and keeps what the server answers."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        s.settimeout(1.0)
        answer = b""
        while not stop.is_set():
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                if answer:
                    break  # the server answered and has nothing more to say
                try:
                    s.sendall(b" ")
                except OSError:
                    break
                continue
            if not chunk:
                break  # the server closed the connection
            answer += chunk
        results.append(answer)


def test_slowloris_is_cut_off_and_neighbours_keep_their_latency(gw: GatewayProcess) -> None:
    port = int(gw.url.rsplit(":", 1)[1])
    baseline = normal_latency_ms(gw)
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=slow_sender, args=(port, stop, results)) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    during = normal_latency_ms(gw)
    for t in threads:
        t.join(timeout=10)
    stop.set()
    assert len(results) == 20
    assert all(r.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in r for r in results)
    assert during < baseline + 20, (baseline, during)


def idle_connections(port: int, n: int) -> Iterator[socket.socket]:
    for _ in range(n):
        yield socket.create_connection(("127.0.0.1", port))


def test_thousands_of_idle_connections(gw: GatewayProcess) -> None:
    port = int(gw.url.rsplit(":", 1)[1])
    before, baseline = rss_mib(gw), normal_latency_ms(gw)
    socks = list(idle_connections(port, 2000))
    try:
        time.sleep(0.5)
        during = normal_latency_ms(gw)
        grown = rss_mib(gw) - before
    finally:
        for s in socks:
            s.close()
    assert during < baseline + 20, (baseline, during)
    assert grown < 150, f"2000 idle connections cost {grown:.0f} MiB"

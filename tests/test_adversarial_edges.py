"""Hostile inputs and leaky edges (issue 12, items 5 and 6), each against the real gateway process.

Deep JSON, header and body slowloris, huge model names, unbounded stream recording, corrupt cache
entries, repeated Authorization headers, trailing-slash redirects, upstream addresses in errors,
/metrics and /docs exposure, and a Redis URL without a scheme.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.conftest import (
    API_KEY,
    KEYS,
    OTHER_KEY,
    ROOT,
    FakeUpstream,
    GatewayProcess,
    free_port,
    metric_value,
    simple_config,
    start_fake_upstream,
)
from tests.redis_fixtures import RedisServer, with_redis

A = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def with_nested(body: dict[str, Any], field: str, depth: int) -> bytes:
    """`body` plus `field` holding arrays nested `depth` deep, as raw JSON (orjson.dumps stops at ~254)."""
    return orjson.dumps(body)[:-1] + f',"{field}":'.encode() + b"[" * depth + b"1" + b"]" * depth + b"}"


def post(gw: GatewayProcess, body: dict[str, Any] | bytes, headers: Any = A, path: str = "/v1/chat/completions",
         timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.url + path, content=content, timeout=timeout,
                      headers=[("Content-Type", "application/json"), *(headers.items() if isinstance(headers, dict)
                                                                        else headers)])


@pytest.fixture
def gw(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream) -> GatewayProcess:
    return gateway_factory({**simple_config(upstream.url, keys=KEYS),
                            "server": {"body_timeout": 2, "header_timeout": 2}})


# ------------------------------------------------------------------------------ item 5: bad input


def test_deep_nesting_is_a_400_naming_the_limit_and_harms_nothing(gw: GatewayProcess) -> None:
    # 300 levels: orjson.loads takes it, orjson.dumps (the body sent upstream) would not (500, breaker probe lost)
    r = post(gw, with_nested(CHAT, "vllm_xargs", 300))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "json_too_deep" and "64" in err["message"], err
    assert post(gw, with_nested(CHAT, "vllm_xargs", 64)).status_code == 400  # 65 levels
    r = post(gw, with_nested(CHAT, "extra_body_field", 63))  # 64 levels: forwarded as before
    assert r.status_code == 200, r.text
    # Brackets inside strings are not nesting.
    assert post(gw, {**CHAT, "messages": [{"role": "user", "content": "[" * 5000}]}).status_code == 200
    assert post(gw, CHAT).status_code == 200


def test_json_depth_limit_is_configurable(gateway_factory: Callable[..., GatewayProcess],
                                          upstream: FakeUpstream) -> None:
    g = gateway_factory({**simple_config(upstream.url), "server": {"max_json_depth": 8}})
    ok = post(g, with_nested(CHAT, "x", 7), headers={})  # the body's object + 7 arrays
    assert ok.status_code == 200, ok.text
    r = post(g, with_nested(CHAT, "x", 8), headers={})
    assert r.status_code == 400 and "limit of 8 levels" in r.json()["error"]["message"]


def _raw_exchange(port: int, first: bytes, then: Callable[[socket.socket], None] | None = None,
                  wait_s: float = 15) -> tuple[bytes, float, float]:
    """Send `first`, optionally run `then`, read until the server closes: (answer, s to answer, s to close)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        if first:
            s.sendall(first)
        if then is not None:
            then(s)
        s.settimeout(wait_s)
        answer, answered = b"", float("inf")
        try:
            while chunk := s.recv(65536):
                answered = min(answered, time.monotonic() - t0)
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer, answered, time.monotonic() - t0


def _port(gw: GatewayProcess) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def test_header_slowloris_is_cut_off(gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    """Headers at 1 byte/s: the connection is closed with a 408 once server.header_timeout (2 s) has passed,
    in each of two worker processes; idle keep-alive and slow upstream answers are not affected."""
    g = gateway_factory({**simple_config(upstream.url), "server": {"header_timeout": 2}}, workers=2)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    closed_after: list[float] = []
    answers: list[bytes] = []

    def one_byte_a_second(s: socket.socket) -> None:
        for i in range(1, 30):
            try:
                s.sendall(request[i:i + 1])
            except OSError:
                return  # the server closed the connection
            time.sleep(1.0)

    def slowloris() -> None:
        answer, _, took = _raw_exchange(_port(g), request[:1], one_byte_a_second)
        answers.append(answer)
        closed_after.append(took)

    threads = [threading.Thread(target=slowloris) for _ in range(4)]  # spread over both workers
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(closed_after) == 4
    # cut at the 2 s deadline, not after the ~29 s the client would take; up to a few s late on a loaded machine
    assert all(1.5 <= t <= 8 for t in closed_after), closed_after
    assert all(a.startswith(b"HTTP/1.1 408") and b"request_timeout" in a for a in answers), answers
    # A connection that opens and says nothing is closed too.
    answer, _, took = _raw_exchange(_port(g), b"")
    assert answer.startswith(b"HTTP/1.1 408") and took <= 8
    # Keep-alive between requests is governed by uvicorn's keep-alive timeout, not the header deadline.
    with httpx.Client(base_url=g.url, timeout=30) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        time.sleep(2.5)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_slow_upstream_answer_outlives_the_header_deadline(gateway_factory: Callable[..., GatewayProcess],
                                                           reset_upstream: FakeUpstream) -> None:
    g = gateway_factory({**simple_config(reset_upstream.url), "server": {"header_timeout": 1}})
    reset_upstream.control(ttft_ms=2500)
    assert post(g, CHAT, headers={}).status_code == 200


def test_headers_without_their_body_time_out(gw: GatewayProcess) -> None:
    """Content-Length: 100 and then nothing: the very first receive() is timed (server.body_timeout, 2 s)."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n")
    answer, answered, closed = _raw_exchange(_port(gw), head, wait_s=20)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and 1.5 <= answered <= 6, answered
    assert closed <= answered + 2 + 1.5, "the rest of the body has one header_timeout (2 s), then the end"

    def trickle(s: socket.socket) -> None:  # the unread body, a byte a second, after the 408 too
        def run() -> None:
            for _ in range(20):
                try:
                    s.sendall(b" ")
                except OSError:
                    return
                time.sleep(1.0)

        threading.Thread(target=run, daemon=True).start()

    answer, answered, closed = _raw_exchange(_port(gw), head, trickle, wait_s=20)
    assert answer.startswith(b"HTTP/1.1 408") or answer == b"", answer[:200]
    assert closed <= 2 + 2 + 1.5, f"a trickled body held the connection {closed:.1f} s"


def test_a_huge_model_name_is_refused_short_and_stored_nowhere(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis_server: RedisServer,
        redis_prefix: str) -> None:
    g = gateway_factory(with_redis({**simple_config(upstream.url, keys=KEYS),
                                    "tenants": {"team-a": {"limits": {"rpm": 1000}}}}, redis_server.url,
                                   redis_prefix))
    name = "q" * (1024 * 1024)
    r = post(g, {**CHAT, "model": name})
    assert r.status_code == 400 and len(r.content) < 1000, r.content[:300]
    assert r.json()["error"]["param"] == "model" and "256" in r.json()["error"]["message"]
    r = post(g, {**CHAT, "metadata": {"task": name}})  # the task name goes to the log and the ledger too
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata.task" and len(r.content) < 1000
    r = post(g, CHAT, headers={**A, "X-Gateway-Task": "q" * 60_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-gateway-task" and len(r.content) < 1000
    r = post(g, {**CHAT, "model": "q" * 256})  # at the cap: an ordinary unknown model
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    time.sleep(0.5)  # the ledger flushes every 50 ms
    assert "q" * 257 not in g.log_path.read_text()
    client = redis_server.client()
    for key in client.scan_iter(match=f"{redis_prefix}*"):
        kind = client.type(key)
        raw = b"".join(v for _, fields in client.xrange(key) for v in fields.values()) if kind == b"stream" \
            else client.dump(key) or b""
        assert b"q" * 257 not in raw, key


def test_unknown_model_requests_count_against_the_rate_limit(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis_server: RedisServer,
        redis_prefix: str) -> None:
    """Probing model names is not free: each 404 takes one request of the tenant's rpm (no tokens, no cost)."""
    g = gateway_factory(with_redis({**simple_config(upstream.url, keys=KEYS),
                                    "tenants": {"team-a": {"limits": {"rpm": 3, "concurrency": 1}}}},
                                   redis_server.url, redis_prefix))
    statuses = [post(g, {**CHAT, "model": f"nope-{i}"}).status_code for i in range(5)]
    assert statuses == [404, 404, 404, 429, 429], statuses
    assert post(g, CHAT).status_code == 429  # the same minute's limit: a real model does not reset it
    other = post(g, {**CHAT, "model": "nope"}, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 404  # team-b has no limit; its probes do not count against team-a


@pytest.fixture
def long_upstream() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["m1"], "--max-model-len", "1000000")
    yield fake
    fake.kill()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_long_cacheable_stream_is_not_kept_in_memory(
        gateway_factory: Callable[..., GatewayProcess], long_upstream: FakeUpstream, redis_server: RedisServer,
        redis_prefix: str) -> None:
    """A cacheable stream far over cache.max_entry_bytes: relayed whole, recorded only up to the limit."""
    g = gateway_factory(with_redis({**simple_config(long_upstream.url), "cache": {"mode": "all"},
                                    "server": {"request_log": "off"}}, redis_server.url, redis_prefix))
    body = {**CHAT, "max_tokens": 200_000, "temperature": 0, "stream": True}
    with httpx.stream("POST", g.url + "/v1/chat/completions", json={**CHAT, "stream": True, "temperature": 0},
                      timeout=60) as r:
        assert r.status_code == 200 and r.read()  # warm every code path first
    before = _peak_rss_mib(g.proc.pid)
    received = 0
    with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.headers["x-gateway-cache"] == "miss"
        for chunk in r.iter_raw(1 << 20):
            received += len(chunk)
    grown = _peak_rss_mib(g.proc.pid) - before
    print(f"peak RSS growth {grown:.1f} MiB for {received / 2**20:.1f} MiB streamed")
    assert received > 40 * 2**20, received  # the client got all of it (~44 MB)
    assert grown < 20, f"peak RSS grew {grown:.0f} MiB while relaying a {received / 2**20:.0f} MB stream"
    with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.headers["x-gateway-cache"] == "miss"  # too big to store: never stored, never half-stored
        r.close()


def test_a_corrupt_cache_entry_is_a_counted_miss(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream, redis_server: RedisServer,
        redis_prefix: str) -> None:
    g = gateway_factory(with_redis({**simple_config(upstream.url), "cache": {"mode": "all"}},
                                   redis_server.url, redis_prefix))
    body = {**CHAT, "temperature": 0}
    assert post(g, body, headers={}).headers["x-gateway-cache"] == "miss"
    assert post(g, body, headers={}).headers["x-gateway-cache"] == "hit"
    client = redis_server.client()
    keys = [k for k in client.scan_iter(match=f"{redis_prefix}c:*") if not k.endswith(b":lock")]
    assert len(keys) == 1
    for garbage in (b"\xff\xfe not an entry", b'{"k": "json"}\n{}', b"[1, 2]\nbody", b'{"k":1,"p":"x"}\nb'):
        client.set(keys[0], garbage)
        r = post(g, body, headers={})
        assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss", (garbage, r.text)
        assert post(g, body, headers={}).headers["x-gateway-cache"] == "hit"  # the miss stored a good entry
    assert metric_value(g.metrics(), "gateway_cache_corrupt_entries_total") == 4


# ------------------------------------------------------------------------------- item 6: leaky edges


def test_two_authorization_headers_are_refused_on_every_route(
        gateway_factory: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    g = gateway_factory({**simple_config(upstream.url, keys=KEYS), "server": {"metrics_key": "scrape-secret"}})
    two = [("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {OTHER_KEY}")]
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models"),
                         ("GET", "/v1/usage"), ("GET", "/metrics")):
        r = httpx.request(method, g.url + path, headers=two, json={**CHAT, "input": "x"}, timeout=10)
        assert r.status_code == 400, (path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "duplicate_header" and "Authorization" in err["message"], (path, err)
        one = httpx.request(method, g.url + path, headers=two[:1], json={**CHAT, "input": "x"}, timeout=10)
        assert one.status_code in (200, 401), (path, one.text)  # /metrics wants its own key


def test_no_redirect_on_a_trailing_slash(gw: GatewayProcess) -> None:
    for method, path in (("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"), ("GET", "/healthz/")):
        r = httpx.request(method, gw.url + path, headers={**A, "Host": "evil.example"}, json=CHAT, timeout=10)
        assert r.status_code == 404, (path, r.status_code, r.headers)
        assert "location" not in r.headers
        assert r.json()["error"]["code"] == "not_found"


def test_upstream_addresses_stay_in_the_gateway_log(gateway_factory: Callable[..., GatewayProcess],
                                                    tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here
    g = gateway_factory(simple_config(f"http://127.0.0.1:{dead}"))
    for body in (CHAT, {**CHAT, "stream": True}):
        r = post(g, body, headers={})
        assert r.status_code == 502, r.text
        msg = r.json()["error"]["message"]
        assert "m1-a" in msg and "127.0.0.1" not in msg and str(dead) not in msg, msg
        assert str(dead) not in r.text


def test_metrics_key_docs_and_openapi_switches(gateway_factory: Callable[..., GatewayProcess],
                                               upstream: FakeUpstream) -> None:
    default = gateway_factory(simple_config(upstream.url, keys=KEYS))
    assert httpx.get(default.url + "/metrics").status_code == 200  # documented default: open
    assert httpx.get(default.url + "/docs").status_code == 404  # Swagger UI from a CDN: off by default
    assert httpx.get(default.url + "/redoc").status_code == 404
    assert httpx.get(default.url + "/openapi.json").status_code == 200
    guarded = gateway_factory({**simple_config(upstream.url, keys=KEYS),
                               "server": {"metrics_key": "scrape-secret", "docs": True}})
    for headers in ({}, A, {"Authorization": "Bearer wrong"}):
        r = httpx.get(guarded.url + "/metrics", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert "gateway_" not in r.text
    r = httpx.get(guarded.url + "/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert r.status_code == 200 and "gateway_requests_total" in r.text
    assert httpx.get(guarded.url + "/docs").status_code == 200
    closed = gateway_factory({**simple_config(upstream.url), "server": {"openapi": False, "docs": True}})
    assert httpx.get(closed.url + "/openapi.json").status_code == 404
    assert httpx.get(closed.url + "/docs").status_code == 404


def test_a_redis_url_without_scheme_fails_check_config_by_name(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({**simple_config("http://127.0.0.1:1"), "redis": {"url": "localhost:6379"}}))
    for args in (["check-config", str(cfg)], ["serve", "--config", str(cfg), "--port", str(free_port())]):
        out = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2, out.stderr
        assert "redis.url" in out.stderr and "redis://" in out.stderr and "Traceback" not in out.stderr
    cfg.write_text(yaml.safe_dump({**simple_config("http://127.0.0.1:1"), "redis": {"url": "unix:///tmp/r.sock"}}))
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr



def test_prometheus_scrapes_metrics_with_the_key(gateway_factory: Callable[..., GatewayProcess],
                                                 upstream: FakeUpstream, tmp_path: Path) -> None:
    """A real Prometheus with `authorization: {credentials_file}` scrapes a keyed /metrics; without it, 401."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (scripts/test.sh installs Debian's prometheus)")
    g = gateway_factory({**simple_config(upstream.url, keys=KEYS), "server": {"metrics_key": "scrape-secret"}})
    assert post(g, CHAT).status_code == 200
    (tmp_path / "key").write_text("scrape-secret\n")
    target = {"static_configs": [{"targets": [g.url.removeprefix("http://")]}]}
    cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [
        {"job_name": "keyed", **target,
         "authorization": {"type": "Bearer", "credentials_file": str(tmp_path / "key")}},
        {"job_name": "keyless", **target}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/api/v1/query"
        deadline = time.monotonic() + 60
        got: dict[str, str] = {}
        while time.monotonic() < deadline and len(got) < 3:
            time.sleep(1)
            try:
                for expr in ("up", 'gateway_requests_total{job="keyed"}'):
                    for s in httpx.get(url, params={"query": expr}, timeout=5).json()["data"]["result"]:
                        got[s["metric"]["__name__"] + "/" + s["metric"]["job"]] = s["value"][1]
            except (httpx.HTTPError, KeyError):
                continue
        assert got.get("up/keyed") == "1" and got.get("up/keyless") == "0", got
        assert float(got["gateway_requests_total/keyed"]) >= 1, got
    finally:
        proc.terminate()
        proc.wait(10)

"""Scale-out as shipped: 3 gateway replicas behind HAProxy sharing Redis with a replica and Sentinel.

One stack (deploy/local/scaleout.py) for the module, real parts only: HAProxy, redis-server x2,
redis-sentinel x3, gateway processes, the test upstream. Limits must hold exactly across replicas,
/v1/usage must not depend on which replica answers, a SIGKILLed replica and a SIGKILLed Redis master
must not cost a ledger record of a request the client saw finish.
"""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
from deploy.local.scaleout import ScaleOut, missing_tools  # noqa: E402

if missing := missing_tools():
    pytest.skip(f"needs Debian packages {' '.join(missing)} (scripts/test.sh installs them)", allow_module_level=True)

KEYS = {name: f"sk-scaleout-{name}" for name in ("rpm", "tpm", "conc", "budget", "usage", "load", "failover", "admin")}
LIMITS = {"rpm": {"rpm": 7}, "tpm": {"tpm": 480}, "conc": {"concurrency": 2}, "budget": {"budget_day_usd": 9}}
ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOut]:
    deployment = {"name": "fake-a", "url": "${UPSTREAM_URL}", "model": "fake-model"}
    cfg: dict[str, Any] = {
        "auth": {"keys": [{"tenant": t, "key": k, "admin": t == "admin"} for t, k in KEYS.items()]},
        "tenants": {t: {"limits": lim} for t, lim in LIMITS.items()},
        "models": {
            "m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}, "deployments": [deployment]},
            "pricey": {"prices": {"prompt_per_1m": 0, "completion_per_1m": 1_000_000},  # $1 per token
                       "deployments": [{**deployment, "name": "fake-b"}]},
        },
        # the shipped defaults otherwise (ledger flushed every 0.2 s, responses wait for their record)
        "redis": {"down_for_s": 0.2},
    }
    with ScaleOut(tmp_path_factory.mktemp("scaleout"), replicas=3, gateway_config=cfg) as so:
        yield so


def control(stack: ScaleOut, **changes: Any) -> None:
    httpx.post(f"{stack.upstream_url}/control", json=changes, timeout=5).raise_for_status()


def burst(url: str, body: dict[str, Any], n: int, headers: dict[str, str]) -> list[httpx.Response]:
    """n requests at once, each on its own connection (HAProxy spreads connections round robin)."""
    def one(_: int) -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def avoid_minute_boundary() -> None:
    into = time.time() % 60
    if into > 50:
        time.sleep(60.2 - into)


def served_by(stack: ScaleOut, request_ids: set[str]) -> list[int]:
    """How many of these requests each replica served (from each replica's request log)."""
    counts = []
    for i in range(stack.replicas):
        log = stack.workdir / f"gateway-{i}-requests.jsonl"
        lines = log.read_bytes().splitlines() if log.exists() else []
        counts.append(sum(1 for line in lines if orjson.loads(line)["request_id"] in request_ids))
    return counts


def ledger(stack: ScaleOut) -> list[dict[str, Any]]:
    """The ledger as an operator reads it: `gateway ledger-export` with the replicas' config (Sentinel URL)."""
    out = subprocess.run([sys.executable, "-m", "gateway", "ledger-export", "--config",
                          str(stack.workdir / "gateway-0.yaml")], capture_output=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return [orjson.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_limits_hold_exactly_across_three_replicas(stack: ScaleOut) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    avoid_minute_boundary()
    control(stack, ttft_ms=1500)  # nobody finishes (and settles) before every request of a burst was admitted
    try:
        rpm = burst(stack.url, body, 24, auth("rpm"))
        # 40 bytes in one message, no tokenizer configured: the byte bound reserves 40 + 16 per message + 96 for
        # the chat template = 152 prompt + 5 completion = 157 tokens; 480 admits 3
        tpm = burst(stack.url, {**body, "messages": [{"role": "user", "content": "a" * 40}], "max_tokens": 5}, 10,
                    auth("tpm"))
        conc = burst(stack.url, body, 8, auth("conc"))
        budget = burst(stack.url, {**body, "model": "pricey"}, 12, auth("budget"))  # $2 each, $9 a day
    finally:
        control(stack, ttft_ms=0)
    for name, results, allowed in (("rpm", rpm, 7), ("tpm", tpm, 3), ("conc", conc, 2), ("budget", budget, 4)):
        codes = [r.status_code for r in results]
        assert codes.count(200) == allowed and codes.count(429) == len(codes) - allowed, (name, codes)
        ids = {r.headers["x-request-id"] for r in results}
        assert all(served_by(stack, ids)), f"{name}: the burst did not reach every replica"
    assert next(r for r in budget if r.status_code == 429).json()["error"]["code"] == "budget_day_exceeded"
    assert "concurrent" in next(r for r in conc if r.status_code == 429).json()["error"]["message"]
    time.sleep(0.3)  # concurrency slots are released at finalize, on whichever replica served the request
    assert [r.status_code for r in burst(stack.url, body, 2, auth("conc"))] == [200, 200]


def test_usage_is_the_same_from_every_replica(stack: ScaleOut) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 3}
    results = burst(stack.url, body, 30, auth("usage"))
    assert all(r.status_code == 200 for r in results)
    # no waiting: a response ends only once its ledger record is in Redis (redis.ledger_before_response)
    answers = [httpx.get(u + "/v1/usage", headers=auth("usage"), timeout=10).json() for u in stack.replica_urls]
    assert answers[0]["totals"]["requests"] == 30
    assert answers[0]["data"] and all(a == answers[0] for a in answers)
    everyone = [httpx.get(u + "/v1/usage", headers=ADMIN, timeout=10).json() for u in stack.replica_urls]
    assert all(a == everyone[0] for a in everyone)
    assert {g["tenant"] for g in everyone[0]["data"]} >= {"rpm", "tpm", "conc", "budget", "usage"}


class Load:
    """Clients sending requests through HAProxy until stopped; each remembers what it was told."""

    def __init__(self, url: str, headers: dict[str, str], clients: int = 6) -> None:
        self.url, self.headers = url, headers
        self.ok: dict[str, float] = {}  # request id -> when the response was complete
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._streams = [i % 2 == 0 for i in range(clients)]  # half the clients stream
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        stream = self._streams.pop() if self._streams else False
        body = {"model": "m1", "messages": [{"role": "user", "content": "load"}], "max_tokens": 4, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}
        with httpx.Client(timeout=30) as client:  # keep-alive: a connection to the victim dies with it
            while not self._stop.is_set():
                rid = uuid.uuid4().hex
                try:
                    r = client.post(self.url + "/v1/chat/completions", json=body,
                                    headers={**self.headers, "x-request-id": rid})
                    if stream:  # finished: [DONE] after a usage chunk
                        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                        done = events[-1:] == ["[DONE]"] and orjson.loads(events[-2])["usage"]["completion_tokens"] == 4
                    else:
                        done = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
                    with self._lock:
                        if r.status_code == 200 and done:
                            self.ok[rid] = time.monotonic()
                        else:
                            self.failed.append((time.monotonic(), f"HTTP {r.status_code}"))
                except (httpx.HTTPError, ValueError, IndexError, KeyError) as e:  # cut off, or an error event
                    with self._lock:
                        self.failed.append((time.monotonic(), type(e).__name__))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_replica_killed_under_load(stack: ScaleOut) -> None:
    control(stack, ttft_ms=20)
    try:
        with Load(stack.url, auth("load")) as load:
            time.sleep(1.5)
            before = len(load.ok)
            killed_at = time.monotonic()
            stack.kill_gateway(2)
            time.sleep(2.5)
    finally:
        control(stack, ttft_ms=0)
    assert before > 20
    after = [t for t in load.ok.values() if t > killed_at + 1.0]
    assert len(after) > 20, "HAProxy did not keep serving from the other replicas"
    # only requests that were on the killed replica at the moment it died can fail
    assert all(t < killed_at + 1.0 for t, _ in load.failed), load.failed
    assert len(load.failed) <= 6, load.failed
    assert stack.backends_up() == 2
    time.sleep(0.3)
    recorded = {r["request_id"] for r in ledger(stack)}
    lost = sorted(set(load.ok) - recorded)
    assert not lost, f"{len(lost)} of {len(load.ok)} finished requests are missing from the ledger"
    stack.restart_gateway(2)
    deadline = time.monotonic() + 10
    while stack.backends_up() < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.backends_up() == 3


def test_redis_master_killed_under_load(stack: ScaleOut) -> None:
    old = stack.master_port()
    control(stack, ttft_ms=20)
    try:
        with Load(stack.url, auth("failover")) as load:
            time.sleep(1.0)
            killed_at = time.monotonic()
            stack.kill_master()
            deadline = time.monotonic() + 20
            while stack.master_port() == old and time.monotonic() < deadline:
                time.sleep(0.1)
            promoted_after = time.monotonic() - killed_at
            time.sleep(2.0)
    finally:
        control(stack, ttft_ms=0)
    assert stack.master_port() != old, "Sentinel did not promote the replica"
    assert promoted_after < 10
    # limits fail open while Redis is away (redis.on_failure.limits: open): requests keep being served
    assert not load.failed, load.failed[:5]
    # every replica writes to the new master now: its ledger has every request the clients saw finish
    time.sleep(0.5)
    records = [r for r in ledger(stack) if r["tenant"] == "failover"]
    recorded = {r["request_id"] for r in records}
    lost = sorted(set(load.ok) - recorded)
    assert not lost, f"{len(lost)} of {len(load.ok)} finished requests are missing from the ledger"
    assert len(records) == len(recorded)  # and none twice
    usage = [httpx.get(u + "/v1/usage", headers=auth("failover"), timeout=10).json() for u in stack.replica_urls]
    assert all(u["totals"]["requests"] == len(load.ok) for u in usage), [u["totals"]["requests"] for u in usage]


def read_stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, int, bool]:
    """One stream on its own connection: (status, content tokens received, ended with usage and [DONE])."""
    tokens, events = 0, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if events[-1] != "[DONE]" and (choices := orjson.loads(events[-1])["choices"]):
                    tokens += bool(choices[0]["delta"].get("content"))
    done = events[-1:] == ["[DONE]"] and len(events) > 1 and orjson.loads(events[-2]).get("usage") is not None
    return r.status_code, tokens, done


def test_sigterm_drains_a_replica_without_cutting_its_streams(stack: ScaleOut) -> None:
    """A graceful stop: /readyz goes 503 at once, HAProxy takes the replica out and sends it nothing new,
    and the streams already on it run to their last token (outcome ok in the ledger), then it exits."""
    victim = 1
    tokens = 40
    body = {"model": "m1", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    ids = [f"drain-{uuid.uuid4().hex[:12]}-{i}" for i in range(9)]
    control(stack, itl_ms=100)  # 40 tokens: ~4 s per stream, far past the 2 s notice
    try:
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            # 9 new connections in a row, round robin over 3 replicas: 3 streams on each
            futures = [pool.submit(read_stream, stack.url, body, {**auth("load"), "x-request-id": rid}) for rid in ids]
            time.sleep(1.0)  # every stream has started (first tokens out)
            t0 = time.monotonic()
            stack.stop_gateway(victim)
            ready = httpx.get(stack.replica_urls[victim] + "/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["draining"] is True
            assert ready.headers["connection"] == "close"  # kept-alive clients move to another replica
            deadline = time.monotonic() + 10
            while stack.backends_up() > 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            marked_down_after = time.monotonic() - t0
            assert stack.backends_up() == 2, "HAProxy did not take the draining replica out"
            # still draining, streams still running: new requests go to the other two replicas
            during = burst(stack.url, {"model": "m1", "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 2}, 6, auth("load"))
            assert [r.status_code for r in during] == [200] * 6
            assert served_by(stack, {r.headers["x-request-id"] for r in during})[victim] == 0
            results = [f.result(timeout=60) for f in futures]
        exit_code = stack.gateways[victim].proc.wait(30)
        exited_after = time.monotonic() - t0
    finally:
        control(stack, itl_ms=0)
    assert results == [(200, tokens, True)] * 9, results
    assert exit_code in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled, once done
    assert served_by(stack, set(ids))[victim] == 3
    assert marked_down_after < 4 and 2.0 < exited_after < 20, (marked_down_after, exited_after)
    print(f"\ndrain: HAProxy marked the replica down {marked_down_after:.2f} s after SIGTERM; "
          f"it exited {exited_after:.2f} s after SIGTERM with its 3 streams complete")
    records = {r["request_id"]: r for r in ledger(stack) if r["request_id"] in set(ids)}
    assert set(records) == set(ids)
    assert all(r["outcome"] == "ok" and r["completion_tokens"] == tokens for r in records.values()), records
    stack.restart_gateway(victim)
    deadline = time.monotonic() + 10
    while stack.backends_up() < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.backends_up() == 3

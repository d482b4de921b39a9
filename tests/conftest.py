"""Shared fixtures: real HTTP servers (the test upstream and the gateway) in their own processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from loadtests.netutil import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["free_port", "wait_http"]  # the load scripts' helpers, re-exported for the tests


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class FakeUpstream:
    """The fake vLLM server process and its control endpoint."""

    url: str
    proc: subprocess.Popen[bytes]

    def control(self, **changes: Any) -> dict[str, Any]:
        return httpx.post(f"{self.url}/control", json=changes, timeout=5).json()

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/control", timeout=5).json()

    def counters(self) -> dict[str, Any]:
        return self.state()["counters"]

    def kill(self) -> None:
        stop(self.proc)


def start_fake_upstream(models: list[str], *args: str) -> FakeUpstream:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(port)]
    for m in models:
        cmd += ["--model", m]
    proc = subprocess.Popen([*cmd, *args], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc=proc)
    return FakeUpstream(url, proc)


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    records_read: int = field(default=0)

    def records(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines() if line.strip()]

    def record(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.records():
                if r["request_id"] == request_id:
                    return r
            time.sleep(0.02)
        raise AssertionError(f"no log record for request {request_id}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, label_text = metric.partition("{")
        if base != name:
            continue
        got = dict(p.split("=", 1) for p in label_text.rstrip("}").split(",") if "=" in p)
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def start_gateway(tmp: Path, config: dict[str, Any], workers: int = 1,
                  env: dict[str, str] | None = None) -> GatewayProcess:
    port = free_port()
    log_path = tmp / f"requests-{port}.jsonl"
    config = {**config, "server": {"request_log": str(log_path), "health_interval": 0.5,
                                   **config.get("server", {})}}
    cfg_path = tmp / f"gateway-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    # Each gateway its own state dir: the embedded SQLite ledger is per test unless a test shares one.
    proc_env = {**os.environ, "GATEWAY_STATE_DIR": str(tmp / f"state-{port}"), **(env or {})}
    proc_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg_path),
                             "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                            cwd=ROOT, env=proc_env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc=proc)
    return GatewayProcess(url, proc, log_path, cfg_path)


def simple_config(upstream_url: str, model: str = "m1", upstream_model: str | None = None,
                  keys: list[dict[str, Any]] | None = None, **deployment: Any) -> dict[str, Any]:
    return {
        "auth": {"keys": keys or []},
        "models": {model: {
            "prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
            "deployments": [{"name": f"{model}-a", "url": upstream_url, "model": upstream_model or model,
                             **deployment}],
        }},
    }


API_KEY = "sk-test-tenant-a"
OTHER_KEY = "sk-test-tenant-b"
KEYS = [{"tenant": "team-a", "key": API_KEY}, {"tenant": "team-b", "key": OTHER_KEY}]


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = start_fake_upstream(["m1", "m1-adapter"])
    yield fake
    fake.kill()


@pytest.fixture(scope="session")
def gateway(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway in front of the fake upstream, with two tenants' keys."""
    cfg = simple_config(upstream.url, keys=KEYS)
    cfg["models"]["m1-adapter"] = {
        "prices": {"prompt_per_1m": 0.5, "completion_per_1m": 1.0},
        "deployments": [{"name": "adapter-a", "url": upstream.url, "model": "m1-adapter"}]}
    gw = start_gateway(tmp_path_factory.mktemp("gw"), cfg)
    yield gw
    stop(gw.proc)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    """A private test upstream for one test (its counters and switches are the test's alone)."""
    f = start_fake_upstream(["m1"])
    yield f
    f.kill()


@pytest.fixture
def fake_b() -> Iterator[FakeUpstream]:
    """A second private test upstream (a second deployment of the same model)."""
    f = start_fake_upstream(["m1"])
    yield f
    f.kill()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(config: dict[str, Any], **kw: Any) -> GatewayProcess:
        gw = start_gateway(tmp_path, config, **kw)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        stop(gw.proc)


@pytest.fixture
def reset_upstream(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The shared fake upstream, back to normal behaviour after the test."""
    yield upstream
    upstream.control(ttft_ms=0, itl_ms=0, fail_status=0, die_after_chunks=-1, malformed_after_chunks=-1,
                     omit_usage=False, error_event_after_chunks=-1, healthy=True)


from tests.redis_fixtures import own_redis, redis_prefix, redis_server  # noqa: E402,F401  (Redis fixtures)
from tests.vllm_fixtures import vllm  # noqa: E402,F401  (the shared real vLLM engines)

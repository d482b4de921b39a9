"""An alert that reaches someone: fail-open admissions during a Redis failover, through real Prometheus and
real Alertmanager, to a webhook.

The scale-out stack with its monitoring (deploy/local/scaleout.py, monitoring=True): 2 gateway replicas
behind HAProxy, Redis master + replica + 3 sentinels, Prometheus (Debian's `prometheus`) evaluating the
shipped rules of deploy/prometheus/ every second, Alertmanager (Debian's `prometheus-alertmanager`)
routing to a webhook receiver. The receiver is this test's own HTTP sink, where a Slack or PagerDuty
bridge would be. The fault is real: the Redis master is SIGKILLed under traffic from a tenant with
limits; while Sentinel promotes the replica the gateways admit that tenant's requests unchecked
(`redis.on_failure.limits: open`), and GatewayLimitsFailOpen must arrive at the webhook.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.local.scaleout import REDIS_EXPORTER, ScaleOut, free_port, missing_tools

if missing := missing_tools(monitoring=True):
    pytest.skip(f"needs Debian packages {' '.join(missing)} (scripts/test.sh installs them)", allow_module_level=True)

KEY = "sk-alerts-limited"
TENANT = "limited"


class Webhook:
    """The receiving end of Alertmanager's webhook_config: remembers each notification and when it came."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with hook.lock:
                    hook.received.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def firing(self, alertname: str) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(t, a) for t, n in self.received for a in n["alerts"]
                    if a["labels"]["alertname"] == alertname and a["status"] == "firing"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    w = Webhook()
    yield w
    w.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[ScaleOut]:
    cfg: dict[str, Any] = {
        "auth": {"keys": [{"tenant": TENANT, "key": KEY}]},
        "tenants": {TENANT: {"limits": {"rpm": 100_000, "budget_day_usd": 1000}}},
        "models": {"m1": {"prices": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                          "deployments": [{"name": "fake-a", "url": "${UPSTREAM_URL}", "model": "fake-model"}]}},
        "redis": {"down_for_s": 0.2},
    }
    with ScaleOut(tmp_path_factory.mktemp("alerts"), replicas=2, gateway_config=cfg, monitoring=True,
                  alert_webhook=webhook.url, scrape_interval_s=1, alert_group_wait_s=1) as so:
        yield so


def query(stack: ScaleOut, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return list(r.json()["data"]["result"])


def wait_until(check: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.25)
    raise AssertionError(f"{what}: not after {timeout:.0f} s")


def test_fail_open_during_a_redis_failover_reaches_the_webhook(stack: ScaleOut, webhook: Webhook) -> None:
    # Before the fault: both replicas scraped, the fail-open counters already there at 0 (so that the first
    # fail-open is an increase), nothing firing, nothing delivered.
    wait_until(lambda: len(query(stack, f'gateway_limits_fail_open_total{{tenant="{TENANT}"}} == 0')) == 2,
               "the fail-open counters of both replicas, at 0, in Prometheus", 60)
    rules = httpx.get(stack.prometheus_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert "GatewayLimitsFailOpen" in {r["name"] for g in rules for r in g["rules"]}
    assert not webhook.firing("GatewayLimitsFailOpen")

    stop = threading.Event()
    served: list[int] = []
    unchecked: list[float] = []  # when a 200 came without x-ratelimit headers: admitted without limits

    def traffic() -> None:
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(stack.url + "/v1/chat/completions", json=body, headers=headers)
                    served.append(r.status_code)
                    if r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers:
                        unchecked.append(time.monotonic())
                except httpx.HTTPError:
                    served.append(0)

    clients = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        old = stack.master_port()
        killed_at = time.monotonic()
        stack.kill_master()
        wait_until(lambda: stack.master_port() != old, "Sentinel promotes the replica", 30)
        promoted_after = time.monotonic() - killed_at
        time.sleep(3.0)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    fail_open = sum(float(s["value"][1]) for s in wait_until(
        lambda: query(stack, f'gateway_limits_fail_open_total{{tenant="{TENANT}"}} > 0'),
        "fail-open admissions scraped", 30))
    assert fail_open > 0

    delivered = wait_until(lambda: webhook.firing("GatewayLimitsFailOpen"), "GatewayLimitsFailOpen at the webhook", 90)
    received_at, alert = delivered[0]
    assert alert["labels"]["tenant"] == TENANT and alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#gatewaylimitsfailopen"
    assert TENANT in alert["annotations"]["summary"]
    assert unchecked and len(unchecked) <= fail_open
    print(f"\nalert delivery: master SIGKILLed, replica promoted after {promoted_after:.1f} s, {fail_open:.0f} "
          f"requests admitted unchecked ({served.count(200)} served, {len(served) - served.count(200)} failed), "
          f"from {unchecked[0] - killed_at:.2f} s to {unchecked[-1] - killed_at:.2f} s after the kill; "
          f"GatewayLimitsFailOpen at the webhook {received_at - killed_at:.1f} s after the kill")
    assert received_at - killed_at < 60


def test_the_redis_memory_rule_reads_series_the_real_exporter_has(stack: ScaleOut) -> None:
    """GatewayRedisMemoryNearMax divides redis_exporter's series: they must exist under those names."""
    if not shutil.which(REDIS_EXPORTER):
        pytest.skip(f"{REDIS_EXPORTER} not installed (Debian's prometheus-redis-exporter)")
    for name in ("redis_memory_used_bytes", "redis_memory_max_bytes"):
        wait_until(lambda name=name: query(stack, name), f"{name} scraped", 30)
    rule = next(r for g in httpx.get(stack.prometheus_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
                for r in g["rules"] if r["name"] == "GatewayRedisMemoryNearMax")
    assert rule["health"] == "ok" and rule["state"] == "inactive"  # no maxmemory on the stack's Redis: silent


def test_the_alertmanager_config_is_valid() -> None:
    """amtool accepts the Compose stack's Alertmanager config (the scale-out stack's is checked by starting it)."""
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian's prometheus-alertmanager ships it)")
    import subprocess

    cfg = Path(__file__).resolve().parent.parent / "deploy" / "compose" / "alertmanager.yml"
    r = subprocess.run([amtool, "check-config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr

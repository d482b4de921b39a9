"""The local scale-out stack: gateway replicas behind HAProxy, sharing Redis (master, replica, 3 sentinels).

Real parts from Debian's packages, each a private process on a free 127.0.0.1 port with its files in
one work directory (the machine's own Redis on 6379 is never touched):

    redis-server  master, AOF on (appendfsync everysec), maxmemory-policy noeviction
    redis-server  replica of the master (same settings, so that it is a full stand-in once promoted)
    redis-sentinel x3, quorum 2, down-after 1000 ms: a dead master is replaced in ~2-3 s
    gateway       N replicas (`python -m gateway serve`), REDIS_URL=redis+sentinel://.../gw
    haproxy       round robin, health check GET /readyz every 500 ms, a refused connection retried
                  on another replica (`retry-on conn-failure`; a request a replica already received is
                  never sent twice), stats and its own Prometheus exporter on /metrics of a second port

A graceful stop (SIGTERM to a replica) drains: the replica answers /readyz with 503 for
DRAIN_NOTICE_S while it still serves, HAProxy marks it down (2 failed checks, ~1 s) and sends it
nothing new, then the replica closes its listener and lets running requests (long streams included)
finish within server.shutdown_grace_s. HAProxy never cuts the sessions of a server it marks down:
a stream in progress on a stopping replica runs to its end.

With `monitoring=True` (the `stack up` command's default) it also runs the alerting path, so that an
alert reaches someone:

    prometheus    scrapes the replicas (job "gateway"), HAProxy and the Redis exporters, evaluates the
                  rules of deploy/prometheus/*.yml and sends alerts to Alertmanager
    prometheus-alertmanager  routes them to `alert_webhook` (a webhook receiver: Slack/PagerDuty bridges,
                  or a test's own HTTP sink)
    prometheus-redis-exporter  one per Redis node (redis_memory_* for GatewayRedisMemoryNearMax), when
                  Debian's package is installed

The upstream is the test upstream (gateway/testing/fake_vllm.py) or URLs of running vLLM engines.
Used by `python -m deploy.local.stack up --replicas 3 --lb haproxy`, by the `replicas` load test
(loadtests/run.py) and by tests/test_scaleout.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
MASTER_NAME = "gw"
# /readyz 503 for this long after SIGTERM: HAProxy's checks (every 0.5 s, down after 2 misses) take the
# replica out well before it stops accepting, also on a loaded machine.
DRAIN_NOTICE_S = 2.0
NEEDS = {"redis-server": "redis-server", "redis-sentinel": "redis-sentinel", "haproxy": "haproxy"}
MONITORING_NEEDS = {"prometheus": "prometheus", "prometheus-alertmanager": "prometheus-alertmanager"}
REDIS_EXPORTER = "prometheus-redis-exporter"  # optional: Debian's redis_exporter
RULES_DIR = ROOT / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_tools(monitoring: bool = False) -> list[str]:
    """Debian packages this stack needs that are not installed."""
    needs = {**NEEDS, **(MONITORING_NEEDS if monitoring else {})}
    return [pkg for tool, pkg in needs.items() if shutil.which(tool) is None]


def redis_cmd(port: int, *args: str) -> str:
    """One Redis command through a raw socket (RESP inline): no client library needed by the stack itself."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(" ".join(args).encode() + b"\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


def wait_for(check: Any, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status < 500)
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int


@dataclass
class ScaleOut:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    workdir: Path
    replicas: int = 3
    # the gateways' config; the stack sets `redis.url` and `server.request_log`, and ${UPSTREAM_URL} in it
    # names the upstream (the test upstream it starts, or the URL given)
    gateway_config: dict[str, Any] = field(default_factory=dict)
    upstream_models: list[str] = field(default_factory=lambda: ["fake-model"])  # for the test upstream
    upstream_args: list[str] = field(default_factory=list)  # extra flags for the test upstream
    upstream_url: str = ""  # set: use this upstream (e.g. a vLLM engine) instead of starting the test one
    gateway_workers: int = 1
    sentinel_down_after_ms: int = 1000
    monitoring: bool = False  # Prometheus with the shipped rules + Alertmanager (+ Redis exporters if installed)
    alert_webhook: str = ""  # where Alertmanager posts alerts ("" = nowhere: see them in its UI)
    scrape_interval_s: float = 5.0  # Prometheus's scrape and rule evaluation interval
    alert_group_wait_s: float = 10.0  # Alertmanager: wait this long to batch a new group's first alerts
    procs: list[Proc] = field(default_factory=list)
    gateways: list[Proc] = field(default_factory=list)
    redis_nodes: list[Proc] = field(default_factory=list)
    sentinels: list[Proc] = field(default_factory=list)
    lb_port: int = 0
    stats_port: int = 0
    prometheus_port: int = 0
    alertmanager_port: int = 0
    redis_exporters: list[Proc] = field(default_factory=list)

    # ------------------------------------------------------------------------------------- processes

    def _spawn(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> Proc:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        log.close()
        proc = Proc(name, p, port)
        self.procs.append(proc)
        return proc

    def _redis(self, name: str, replica_of: int | None = None) -> Proc:
        port = free_port()
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        # Limits, leases and the ledger must never be evicted, and survive a restart (AOF). The cache
        # lives in the same instance here; docs/deploy.md explains when to give it its own LRU Redis.
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
                "--daemonize", "no", "--loglevel", "warning"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        proc = self._spawn(name, args, port)
        wait_for(lambda: redis_cmd(port, "PING").startswith("+PONG"), name, 10, proc.proc)
        return proc

    def _sentinel(self, i: int, master_port: int) -> Proc:
        port = free_port()
        conf = self.workdir / f"sentinel-{i}.conf"  # sentinel rewrites its own file: one each
        conf.write_text(f"""port {port}
bind 127.0.0.1
dir {self.workdir}
sentinel resolve-hostnames no
sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2
sentinel down-after-milliseconds {MASTER_NAME} {self.sentinel_down_after_ms}
sentinel failover-timeout {MASTER_NAME} 10000
sentinel parallel-syncs {MASTER_NAME} 1
""")
        proc = self._spawn(f"sentinel-{i}", ["redis-sentinel", str(conf)], port)
        wait_for(lambda: redis_cmd(port, "PING").startswith("+PONG"), f"sentinel-{i}", 10, proc.proc)
        return proc

    def _haproxy(self) -> Proc:
        self.lb_port, self.stats_port = free_port(), free_port()
        servers = "\n".join(f"    server gw{i} 127.0.0.1:{g.port}" for i, g in enumerate(self.gateways))
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(f"""global
    maxconn 4096
    log stdout format raw local0 warning

defaults
    mode http
    log global
    option dontlognull
    option http-no-delay  # stream chunks (SSE tokens) go out at once, not coalesced
    timeout connect 1s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 30s

frontend gateway
    bind 127.0.0.1:{self.lb_port}
    default_backend gateways

backend gateways
    balance roundrobin
    # /readyz: 503 from the moment a replica starts draining (SIGTERM), so it is out after 2 checks (~1 s)
    option httpchk GET /readyz
    http-check expect status 200
    # a replica that refuses connections is skipped at once (retried on another); one marked down keeps
    # its established sessions: a stream on a draining replica runs to its end (no on-marked-down
    # shutdown-sessions; a killed replica's connections die with it anyway)
    retries 2
    option redispatch 1
    retry-on conn-failure
    default-server check inter 500ms fall 2 rise 2
{servers}

frontend stats
    bind 127.0.0.1:{self.stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 2s
""")
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejected {cfg}: {check.stderr or check.stdout}")
        proc = self._spawn("haproxy", ["haproxy", "-db", "-f", str(cfg)], self.lb_port)
        wait_for(lambda: self.backends_up() == len(self.gateways), "haproxy (all replicas up)", 20, proc.proc)
        return proc

    def _gateway(self, i: int, port: int | None = None) -> Proc:
        port = port or free_port()
        cfg = {**self.gateway_config, "redis": {**self.gateway_config.get("redis", {}), "url": self.redis_url},
               "server": {"drain_notice_s": DRAIN_NOTICE_S, **self.gateway_config.get("server", {}),
                          "request_log": str(self.workdir / f"gateway-{i}-requests.jsonl")}}
        path = self.workdir / f"gateway-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False).replace("${UPSTREAM_URL}", self.upstream_url))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port),
               "--workers", str(self.gateway_workers), "--log-level", "warning"]
        # Each replica its own state dir, kept across restarts: its spool (records and budget charges waiting
        # for Redis) is replayed by the replica that starts on it (docs/redis.md, "The spool").
        state = self.workdir / f"gateway-{i}-state"
        proc = self._spawn(f"gateway-{i}", cmd, port, env={"GATEWAY_STATE_DIR": str(state)})
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), f"gateway-{i}", 60, proc.proc)
        return proc

    def _alertmanager(self) -> Proc:
        self.alertmanager_port = free_port()
        d = self.workdir / "alertmanager"
        d.mkdir(exist_ok=True)
        hooks = [{"url": self.alert_webhook, "send_resolved": True}] if self.alert_webhook else []
        cfg = {"route": {"receiver": "webhook", "group_by": ["alertname", "tenant", "instance"],
                         "group_wait": f"{self.alert_group_wait_s:g}s", "group_interval": "5m",
                         "repeat_interval": "4h"},
               "receivers": [{"name": "webhook", **({"webhook_configs": hooks} if hooks else {})}]}
        (d / "alertmanager.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        # --cluster.listen-address= : one Alertmanager, no gossip port (Debian's default would bind 0.0.0.0:9094)
        proc = self._spawn("alertmanager", ["prometheus-alertmanager", f"--config.file={d / 'alertmanager.yml'}",
                                            f"--storage.path={d / 'data'}", "--cluster.listen-address=",
                                            f"--web.listen-address=127.0.0.1:{self.alertmanager_port}"],
                           self.alertmanager_port)
        wait_for(lambda: http_ok(f"{self.alertmanager_url}/-/ready"), "alertmanager", 30, proc.proc)
        return proc

    def _redis_exporter(self, node: Proc) -> Proc:
        port = free_port()
        proc = self._spawn(f"redis-exporter-{node.name}", [REDIS_EXPORTER, f"-redis.addr=redis://127.0.0.1:{node.port}",
                                                          f"-web.listen-address=127.0.0.1:{port}"], port)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/metrics"), f"redis exporter of {node.name}", 20, proc.proc)
        return proc

    def _prometheus(self) -> Proc:
        self.prometheus_port = free_port()
        every = f"{self.scrape_interval_s:g}s"
        gw_job: dict[str, Any] = {"job_name": "gateway", "static_configs": [{"targets": [
            f"127.0.0.1:{g.port}" for g in self.gateways]}]}
        if key := self.gateway_config.get("server", {}).get("metrics_key"):
            gw_job["authorization"] = {"credentials": key}
        jobs = [gw_job, {"job_name": "haproxy", "static_configs": [{"targets": [f"127.0.0.1:{self.stats_port}"]}]},
                {"job_name": "alertmanager", "static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]
        if self.redis_exporters:
            jobs.append({"job_name": "redis", "static_configs": [{"targets": [
                f"127.0.0.1:{e.port}" for e in self.redis_exporters]}]})
        cfg = {"global": {"scrape_interval": every, "evaluation_interval": every,
                          "scrape_timeout": f"{min(self.scrape_interval_s, 10):g}s"},
               "rule_files": [str(RULES_DIR / "*.yml")],
               "alerting": {"alertmanagers": [{"static_configs": [{"targets": [
                   f"127.0.0.1:{self.alertmanager_port}"]}]}]},
               "scrape_configs": jobs}
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = self._spawn("prometheus", ["prometheus", f"--config.file={path}",
                                          f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                                          f"--web.listen-address=127.0.0.1:{self.prometheus_port}"],
                           self.prometheus_port)
        wait_for(lambda: http_ok(f"{self.prometheus_url}/-/ready"), "prometheus", 30, proc.proc)
        return proc

    # ----------------------------------------------------------------------------------------- public

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    @property
    def redis_url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    @property
    def url(self) -> str:
        """The one address clients use: HAProxy."""
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def replica_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{g.port}" for g in self.gateways]

    def start(self) -> ScaleOut:
        if missing := missing_tools(self.monitoring):
            raise RuntimeError(f"missing Debian packages: {' '.join(missing)} (apt-get install {' '.join(missing)})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            master = self._redis("redis-a")
            replica = self._redis("redis-b", replica_of=master.port)
            self.redis_nodes = [master, replica]
            wait_for(lambda: "master_link_status:up" in redis_cmd(replica.port, "INFO", "replication"),
                     "redis replica in sync", 10)
            self.sentinels = [self._sentinel(i, master.port) for i in range(3)]
            wait_for(lambda: all(self._sentinel_peers(s.port) >= 2 for s in self.sentinels), "sentinels see each other",
                     20)
            if not self.upstream_url:
                port = free_port()
                args = [a for m in self.upstream_models for a in ("--model", m)]
                up = self._spawn("upstream", [sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(port),
                                              *args, *self.upstream_args], port)
                self.upstream_url = f"http://127.0.0.1:{port}"
                wait_for(lambda: http_ok(f"{self.upstream_url}/health"), "test upstream", 20, up.proc)
            self.gateways = [self._gateway(i) for i in range(self.replicas)]
            self._haproxy()
            if self.monitoring:
                if shutil.which(REDIS_EXPORTER):
                    self.redis_exporters = [self._redis_exporter(n) for n in self.redis_nodes]
                self._alertmanager()
                self._prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel_peers(self, port: int) -> int:
        reply = redis_cmd(port, "SENTINEL", "SENTINELS", MASTER_NAME)
        return reply.count("runid") if reply.startswith("*") else 0

    def master_port(self) -> int:
        """Where the sentinels say the master is now."""
        for s in self.sentinels:
            try:
                lines = redis_cmd(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME).split("\r\n")
                if lines[0] == "*2":
                    return int(lines[4])
            except OSError:
                continue
        raise RuntimeError("no sentinel names a master")

    def backends_up(self) -> int:
        """Replicas HAProxy currently routes to (from its CSV stats)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as r:
            rows = r.read().decode().splitlines()
        head = rows[0].lstrip("# ").split(",")
        status, px, sv = head.index("status"), head.index("pxname"), head.index("svname")
        return sum(1 for row in rows[1:] if (c := row.split(","))[px] == "gateways"
                   and c[sv] not in ("BACKEND", "FRONTEND") and c[status].startswith("UP"))

    def kill_gateway(self, i: int) -> None:
        self.gateways[i].proc.send_signal(signal.SIGKILL)
        self.gateways[i].proc.wait()

    def stop_gateway(self, i: int) -> None:
        """A graceful stop (SIGTERM), as an orchestrator sends it; returns at once (wait on its proc)."""
        self.gateways[i].proc.send_signal(signal.SIGTERM)

    def restart_gateway(self, i: int) -> None:
        """Start replica `i` again on its old port (HAProxy's health check brings it back)."""
        self.gateways[i] = self._gateway(i, self.gateways[i].port)

    def kill_redis(self) -> None:
        """SIGKILL every Redis node (master and replica): an outage no failover can bridge."""
        for node in self.redis_nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGKILL)
                node.proc.wait()

    def restart_redis(self) -> None:
        """Start the killed Redis nodes again on their ports and data (AOF); the sentinels find the master."""
        for i, node in enumerate(self.redis_nodes):
            if node.proc.poll() is None:
                continue
            self.procs.remove(node)
            args = node.proc.args
            assert isinstance(args, list)
            proc = self._spawn(node.name, [str(a) for a in args], node.port)
            wait_for(lambda p=node.port: redis_cmd(p, "PING").startswith("+PONG"), node.name, 10, proc.proc)
            self.redis_nodes[i] = proc

    def kill_master(self) -> int:
        """SIGKILL the Redis master; returns its port."""
        port = self.master_port()
        node = next(n for n in self.redis_nodes if n.port == port)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        return port

    def describe(self) -> str:
        lines = [f"  load balancer (haproxy): {self.url}   stats: http://127.0.0.1:{self.stats_port}/stats"
                 f"   metrics: http://127.0.0.1:{self.stats_port}/metrics"]
        lines += [f"  gateway-{i}: {u}" for i, u in enumerate(self.replica_urls)]
        lines += [f"  redis: master 127.0.0.1:{self.redis_nodes[0].port}, replica 127.0.0.1:{self.redis_nodes[1].port}"
                  f" (AOF, noeviction); sentinels {', '.join(str(s.port) for s in self.sentinels)}",
                  f"  gateway REDIS_URL: {self.redis_url}",
                  f"  upstream: {self.upstream_url}"]
        if self.monitoring:
            lines += [f"  prometheus: {self.prometheus_url} (rules: deploy/prometheus/*.yml)   alertmanager: "
                      f"{self.alertmanager_url} -> {self.alert_webhook or 'no receiver (--alert-webhook URL)'}"]
        lines += [f"  logs and data: {self.workdir}"]
        return "\n".join(lines)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                p.proc.terminate()
        for p in reversed(self.procs):
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()

    def __enter__(self) -> ScaleOut:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

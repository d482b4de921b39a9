"""Scenario runner: starts what a scenario needs, runs locust headless against 127.0.0.1, writes a report.

    python -m loadtests.run SCENARIO [--target fake|local] [--users N] [--duration S] [--max-requests N]
                                     [--seed N] [--out DIR]

Scenarios (see docs/loadtests.md):
  steady    constant load, all four user kinds (streaming, non-streaming, embeddings, task mix)
  overload  users ramp up past the large model's capacity; the `overload` rule moves new requests to
            the small model (fallback share rises) while the large model's latency stays bounded
  cache     mostly repeated deterministic prompts, gateway cache in Redis: hit ratio and saved USD
  kill      the large model has two deployments; one is killed (SIGKILL) mid-run
  replicas  three gateway replicas behind HAProxy, sharing Redis (master, replica, Sentinel): the local
            scale-out stack of deploy/local/scaleout.py

Targets: `fake` (the test upstream, gateway-only capacity; starts in a second) and `local` (real vLLM
CPU engines from deploy/local/engines.py: chat `smollm2` + LoRA `sentiment`, embeddings `minilm`).
Everything listens on 127.0.0.1 and is stopped at the end. The run directory holds report.md, PNG plots,
records.jsonl, locust's CSV files and HTML report, the gateway config and its request log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadtests.netutil import free_port, wait_http
from loadtests.report import write_report

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ALL_USERS = ["StreamingChatUser", "ChatUser", "EmbeddingsUser", "MixedTaskUser"]


@dataclass(frozen=True)
class Scenario:
    users: int
    user_classes: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ramp: bool = False  # spread spawning over most of the run instead of starting everyone at once
    redis: bool = False
    replicas: int = 1
    big_deployments: int = 1
    big_capacity: int = 64  # fake target: requests the large model serves at once (the rest queue)
    kill_at: float | None = None  # share of the duration after which one large deployment is killed
    task_route: bool = True  # the route also names the adapter (classification); off: large -> small only


SCENARIOS: dict[str, Scenario] = {
    "steady": Scenario(8, ALL_USERS),
    "overload": Scenario(20, ["StreamingChatUser"], {"LOADTEST_WAIT": "0.2,0.5", "LOADTEST_MIX": "short=1"},
                         ramp=True, big_capacity=4, task_route=False),
    "cache": Scenario(8, ["ChatUser", "StreamingChatUser"], {"LOADTEST_MIX": "short=2,repeat=8"}, redis=True),
    "kill": Scenario(8, ["ChatUser", "StreamingChatUser"], big_deployments=2, kill_at=0.4),
    "replicas": Scenario(8, ["ChatUser", "StreamingChatUser"], {"LOADTEST_MIX": "short=4,repeat=6"}, redis=True,
                         replicas=3),
}


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Stack:
    """The processes of one run, stopped in reverse order."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.engines: list[Any] = []
        self.scaleouts: list[Any] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.procs.append((name, proc))
        return proc

    def fake(self, name: str, models: list[str], capacity: int, ttft_ms: float, itl_ms: float) -> str:
        port = free_port()
        proc = self.start(name, [PY, "-m", "loadtests.fake_loaded", "--port", str(port), "--capacity", str(capacity),
                                 "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
                                 *[a for m in models for a in ("--model", m)]])
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc=proc)
        return url

    def redis(self) -> str:
        port = free_port()
        proc = self.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(self.run_dir)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return f"redis://127.0.0.1:{port}/0"
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start (see redis.log)")

    def gateway(self, name: str, config: dict[str, Any]) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        cfg = {**config, "server": {**config.get("server", {}),
                                    "request_log": str(self.run_dir / f"{name}-requests.jsonl")}}
        path = self.run_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = self.start(name, [PY, "-m", "gateway", "serve", "--config", str(path), "--port", str(port),
                                 "--log-level", "warning"])
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc=proc)
        return url, proc

    def scaleout(self, config: dict[str, Any], replicas: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
        """Gateway replicas behind HAProxy sharing Redis with a replica and Sentinel (deploy/local/scaleout.py)."""
        from deploy.local.scaleout import ScaleOut

        cfg = {**config, "redis": {k: v for k, v in config.get("redis", {}).items() if k != "url"}}
        so = ScaleOut(self.run_dir, replicas=replicas, gateway_config=cfg, upstream_url="(in the config)")
        self.scaleouts.append(so)
        so.start()
        return so.url, [g.proc for g in so.gateways]

    def stop(self) -> None:
        for so in reversed(self.scaleouts):
            so.stop()
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.engines:
            from deploy.local import engines

            for e in self.engines:
                engines.stop(e)


Setup = tuple[dict[str, Any], dict[str, str], dict[str, subprocess.Popen[bytes]]]  # config, locust env, killables


def fake_config(stack: Stack, sc: Scenario) -> Setup:
    bigs = [stack.fake(f"big-{i}", ["big-base"], sc.big_capacity, 40, 8) for i in range(sc.big_deployments)]
    small = stack.fake("small", ["small-base", "nlu-adapter", "embed-base"], 0, 10, 2)
    timeouts = {"connect": 1, "first_token": 10, "total": 60}
    cfg: dict[str, Any] = {
        "models": {
            "big": {"prices": {"prompt_per_1m": 3.0, "completion_per_1m": 15.0}, "tier": "large",
                    "deployments": [{"name": f"big-{i}", "url": u, "model": "big-base", "timeouts": timeouts}
                                    for i, u in enumerate(bigs)]},
            "small": {"prices": {"prompt_per_1m": 0.2, "completion_per_1m": 0.6}, "tier": "small",
                      "deployments": [{"name": "small-0", "url": small, "model": "small-base"}]},
            "nlu": {"prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2}, "tier": "adapter",
                    "deployments": [{"name": "nlu-0", "url": small, "model": "nlu-adapter"}]},
            "embed": {"prices": {"prompt_per_1m": 0.02}, "tier": "small",
                      "deployments": [{"name": "embed-0", "url": small, "model": "embed-base"}]},
        },
        "routes": {"assistant": {"candidates": ["big", "small", "nlu"] if sc.task_route else ["big", "small"],
                                 "tasks": {"classification": "nlu"} if sc.task_route else {},
                                 # max_in_flight reacts at once; max_waiting reads vLLM's /metrics
                                 "overload": {"max_waiting": 2, "max_in_flight": sc.big_capacity + 2}}},
        "circuit_breaker": {"failures": 3, "cooldown_s": 5.0},
        "metrics_scrape_interval": 0.5,
    }
    procs = {name: p for name, p in stack.procs if name.startswith("big-")}
    return cfg, {"LOADTEST_EMBED_MODEL": "embed"}, procs


def local_config(stack: Stack, sc: Scenario) -> Setup:
    from deploy.local import engines

    engines.ensure_ready(verbose=False)
    chat_port, emb_port = free_port(), free_port()
    chat = engines.start_chat_engine(chat_port)
    emb = engines.start_embedding_engine(emb_port)
    stack.engines += [chat, emb]
    chat_url, emb_url = f"http://127.0.0.1:{chat_port}", f"http://127.0.0.1:{emb_port}"
    engines.wait_healthy(chat_url, timeout=600, proc=chat)
    engines.wait_healthy(emb_url, timeout=600, proc=emb)
    timeouts = {"connect": 2, "first_token": 120, "total": 600}
    cfg: dict[str, Any] = {
        "models": {
            "smollm2": {"cost_basis": {"gpu_usd_per_hour": 2.0}, "tier": "large",
                        "deployments": [{"name": "smollm2-0", "url": chat_url, "model": "smollm2",
                                         "timeouts": timeouts}]},
            "sentiment": {"cost_basis": {"gpu_usd_per_hour": 2.0}, "tier": "adapter",
                          "deployments": [{"name": "sentiment-0", "url": chat_url, "model": "sentiment",
                                           "timeouts": timeouts}]},
            "minilm": {"cost_basis": {"gpu_usd_per_hour": 1.0}, "tier": "small",
                       "deployments": [{"name": "minilm-0", "url": emb_url, "model": "minilm"}]},
        },
        "routes": {"assistant": {"candidates": ["smollm2", "sentiment"], "tasks": {"classification": "sentiment"},
                                 "overload": {"max_waiting": 2, "max_in_flight": 8}}},
        "metrics_scrape_interval": 1.0,
    }
    # CPU engines: short prompts, no long-context requests unless asked for
    return cfg, {"LOADTEST_EMBED_MODEL": "minilm", "LOADTEST_MIX": "short=8,repeat=2"}, {}


def run(scenario: str, target: str, users: int | None, duration: float, max_requests: int, seed: int,
        out: Path | None) -> dict[str, Any]:
    sc = SCENARIOS[scenario]
    if target == "local" and sc.kill_at is not None:
        raise SystemExit("the kill scenario needs two deployments of one model: use --target fake")
    users = users or sc.users
    run_dir = out or ROOT / "loadtests" / "results" / f"{scenario}-{target}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("records.jsonl",):
        (run_dir / stale).unlink(missing_ok=True)
    stack = Stack(run_dir)
    events: list[dict[str, Any]] = []
    notes = ""
    try:
        cfg, env, bigs = (fake_config if target == "fake" else local_config)(stack, sc)
        if sc.replicas > 1:
            host, gateways = stack.scaleout(cfg, sc.replicas)
        else:
            if sc.redis:
                cfg["redis"] = {"url": stack.redis()}
            host, gw = stack.gateway("gateway-0", cfg)
            gateways = [gw]
        spawn_rate = users / max(1.0, 0.7 * duration) if sc.ramp else float(users)
        cmd = [PY, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "--host", host,
               "-u", str(users), "-r", f"{spawn_rate:.3f}", "-t", f"{int(duration)}s", "--stop-timeout", "5",
               "--csv", str(run_dir / "locust"), "--csv-full-history", "--html", str(run_dir / "locust.html"),
               "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0", *sc.user_classes]
        locust_env = {**os.environ, "PYTHONPATH": str(ROOT), "LOADTEST_SEED": str(seed),
                      "LOADTEST_RECORDS": str(run_dir / "records.jsonl"),
                      "LOADTEST_MAX_REQUESTS": str(max_requests), **env, **sc.env}
        timers: list[threading.Timer] = []
        if sc.kill_at is not None and len(bigs) > 1:
            victim_name, victim = list(bigs.items())[-1]

            def kill() -> None:
                victim.send_signal(signal.SIGKILL)
                events.append({"at": time.time(), "what": f"{victim_name} killed (SIGKILL)"})

            timers.append(threading.Timer(sc.kill_at * duration, kill))
            notes = "failure fallback: the gateway retries a request on another deployment before its first byte"
        with open(run_dir / "locust.log", "wb") as log:
            locust = subprocess.Popen(cmd, cwd=ROOT, env=locust_env, stdout=log, stderr=subprocess.STDOUT)
            for t in timers:
                t.start()
            try:
                locust.wait(duration + 60)
            finally:
                for t in timers:
                    t.cancel()
                if locust.poll() is None:
                    locust.kill()
        gw_peak = [peak_rss_mib(p.pid) for p in gateways]
        per_replica = []
        for i in range(sc.replicas):
            log_path = run_dir / f"gateway-{i}-requests.jsonl"
            per_replica.append(sum(1 for _ in log_path.open()) if log_path.exists() else 0)
        meta = {"scenario": scenario, "target": target, "users": users, "duration": duration, "seed": seed,
                "max_requests": max_requests, "events": events, "notes": notes, "user_classes": sc.user_classes,
                "gateway_peak_rss_mib": gw_peak, "requests_per_replica": per_replica,
                "command": f"python -m loadtests.run {scenario} --target {target} --users {users} "
                           f"--duration {duration:g} --seed {seed}"
                           + (f" --max-requests {max_requests}" if max_requests else ""),
                "locust_command": shlex.join(cmd[1:])}
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    finally:
        stack.stop()
    result = write_report(run_dir)
    print(result["line"])
    print(f"report: {run_dir / 'report.md'}")
    return {"run_dir": str(run_dir), **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--target", choices=["fake", "local"], default="fake")
    ap.add_argument("--users", type=int, help="virtual users (default: the scenario's)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (0: no limit)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="run directory (default loadtests/results/SCENARIO-TARGET-TIME)")
    a = ap.parse_args()
    run(a.scenario, a.target, a.users, a.duration, a.max_requests, a.seed, a.out)


if __name__ == "__main__":
    main()

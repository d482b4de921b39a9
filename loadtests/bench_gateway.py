"""Benchmark: the gateway against a bare aiohttp pass-through and the upstream alone, all in one run.

Each target (one process pinned to core 0; the test upstream, wrk and the Python drivers on core 1):
  * upstream     the test upstream (gateway/testing/fake_vllm.py) called directly
  * passthrough  loadtests/passthrough.py: bare aiohttp server + client, no features (the floor)
  * pt-*         the same pass-through on other servers and clients (loadtests/passthrough_servers.py):
                 uvicorn (raw ASGI) or granian (ASGI, RSGI), with aiohttp's client, pyreqwest or pyqwest (Rust)
  * example-granian  the gateway (example config) served by granian's ASGI server instead of uvicorn
  * example*     `gateway serve` with deploy/examples/single-vllm.yaml (no Redis: SQLite ledger), with
                 its request log to a pipe (stderr, the example's default), to a file, off, and with the
                 ledger in memory (so the SQLite ledger's cost shows)
  * example-tracing  the example config with tracing on at 100 % sampling, exporting OTLP/HTTP to a
                 receiver (loadtests/otlp_sink.py, decoding and counting the spans) on core 1 (not in "all");
                 example-tracing-N: N % sampled
  * local        deploy/local/gateway.yaml (routes, cache, three models), no Redis
  * redis        the same with REDIS_URL (a redis-server started here on core 1)
Figures per target: added p50/p99 at fixed open-loop rates (from each request's scheduled send time,
minus the upstream's own), max non-streaming req/s (wrk, 16 connections) and CPU per request, max
32-chunk streams/s (16 concurrent), and resident memory after 20 % and 100 % of --requests requests.
The headline: gateway req/s / pass-through req/s, which means the same on any machine (absolute
figures differ up to 3x between machines of one kind, and this machine is shared).

    .venv/bin/python -m loadtests.bench_gateway [--targets all] [--requests 100000] [--rates 300] \
        [--duration 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
from loadtests.bench_drivers import cpu_seconds, open_loop, rss_mb, streams, wrk, wrk_requests  # noqa: E402
from loadtests.bench_policy import policy_figures  # noqa: E402
from loadtests.netutil import free_port, wait_http  # noqa: E402

TARGET_CORE, DRIVER_CORE = "0", "1"
TARGETS = ("upstream", "passthrough", "example", "example-log-file", "example-log-off", "example-ledger-memory",
           "local", "redis")
# The floor on other servers and clients: name -> (server, interface, client); not in "all" (--targets floors).
FLOORS = {"pt-uvicorn": ("uvicorn", "asgi", "aiohttp"), "pt-uvicorn-pyreqwest": ("uvicorn", "asgi", "pyreqwest"),
          "pt-uvicorn-pyqwest": ("uvicorn", "asgi", "pyqwest"),
          "pt-granian-asgi": ("granian", "asgi", "aiohttp"), "pt-granian-rsgi": ("granian", "rsgi", "aiohttp"),
          "pt-granian-rsgi-pyreqwest": ("granian", "rsgi", "pyreqwest")}
BIN = Path(sys.executable).parent


@dataclass
class Target:
    name: str
    model: str
    start: Callable[[], subprocess.Popen[bytes] | None]  # None: nothing to start (the upstream itself)
    url: str


def spawn(cmd: list[str], core: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(["taskset", "-c", core, *cmd], cwd=ROOT, env={**os.environ, **(env or {})}, **kw)


def gateway_cmd(cfg: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port),
            "--log-level", "warning"]


def build_targets(names: list[str], up_url: str, tmp: Path, redis_url: str | None,
                  otlp_url: str | None = None) -> list[Target]:
    example = (ROOT / "deploy/examples/single-vllm.yaml").read_text()
    local = (ROOT / "deploy/local/gateway.yaml").read_text()
    out: list[Target] = []
    for name in names:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"VLLM_URL": up_url, "VLLM_MODEL": "m1", "CHAT_URL": up_url, "EMBED_URL": up_url,
               "GATEWAY_API_KEY": "", "REDIS_URL": "", "GATEWAY_STATE_DIR": str(tmp / f"state-{name}")}
        model = "m1"
        if name == "upstream":
            out.append(Target(name, model, lambda: None, up_url))
            continue
        if name == "passthrough":
            def start_bare(port: int = port) -> subprocess.Popen[bytes]:
                return spawn([sys.executable, "-m", "loadtests.passthrough", "--port", str(port),
                              "--upstream", up_url], TARGET_CORE)
            out.append(Target(name, model, start_bare, url))
            continue
        if name in FLOORS:
            server, interface, client = FLOORS[name]
            app = f"loadtests.passthrough_servers:{interface}_app"
            cmd = [str(BIN / "uvicorn"), app, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                   "--no-access-log", "--log-level", "warning"] if server == "uvicorn" else [
                str(BIN / "granian"), "--interface", interface, "--port", str(port), "--loop", "uvloop",
                "--workers", "1", "--log-level", "warning", app]

            def start_floor(cmd: list[str] = cmd, client: str = client) -> subprocess.Popen[bytes]:
                return spawn(cmd, TARGET_CORE, {"PT_UPSTREAM": up_url, "PT_CLIENT": client})
            out.append(Target(name, model, start_floor, url))
            continue
        if name == "example-granian":
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(example)
            granian = [str(BIN / "granian"), "--interface", "asgi", "--factory", "--port", str(port), "--loop",
                       "uvloop", "--workers", "1", "--log-level", "warning", "gateway.app:create_app"]

            def start_granian(cmd: list[str] = granian, env: dict[str, str] = env,
                              cfg: Path = cfg) -> subprocess.Popen[bytes]:
                return spawn(cmd, TARGET_CORE, {**env, "GATEWAY_CONFIG": str(cfg)}, stderr=subprocess.PIPE)
            out.append(Target(name, model, start_granian, url))
            continue
        text, model = _config_text(name, example, local, tmp, otlp_url)
        if name == "redis":
            env["REDIS_URL"] = redis_url or ""
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(text)

        def start(cfg: Path = cfg, port: int = port, env: dict[str, str] = env) -> subprocess.Popen[bytes]:
            # stderr (the request log) goes to a pipe that `cat` drains on the driver's core, as a container
            # runtime's log driver would; not to /dev/null, which costs nothing.
            return spawn(gateway_cmd(cfg, port), TARGET_CORE, env, stderr=subprocess.PIPE)
        out.append(Target(name, model, start, url))
    return out


def _config_text(name: str, example: str, local: str, tmp: Path, otlp_url: str | None) -> tuple[str, str]:
    """A gateway target's config file and the model its requests name."""
    if name == "example-log-file":
        return example.replace("request_log: stderr", f"request_log: {tmp / 'requests.jsonl'}"), "m1"
    if name == "example-log-off":
        return example.replace("request_log: stderr", "request_log: \"off\""), "m1"
    if name == "example-ledger-memory":
        return example + "\nledger: {path: memory}\n", "m1"
    if name.startswith("example-tracing"):  # example-tracing: 100 % sampled; example-tracing-10: 10 %
        ratio = int(name.rpartition("-")[2]) / 100 if name[-1].isdigit() else 1.0
        return example + f"\ntracing: {{otlp_endpoint: '{otlp_url}', sample_ratio: {ratio}}}\n", "m1"
    if name in ("local", "redis"):
        return local, "smollm2"
    return example, "m1"


def measure(t: Target, a: argparse.Namespace, direct_lat: dict[str, dict[str, float]]) -> dict[str, Any]:
    proc = t.start()
    drain = None
    if proc is not None and proc.stderr is not None:
        drain = spawn(["cat"], DRIVER_CORE, stdin=proc.stderr)
        proc.stderr.close()
    res: dict[str, Any] = {"name": t.name}
    try:
        if proc is not None:
            wait_http(t.url + "/healthz", timeout=60, proc=proc)
        chat = f"{t.url}/v1/chat/completions"
        body = orjson.dumps({"model": t.model, "messages": [{"role": "user", "content": "say something short"}],
                             "max_tokens": 16})
        stream_body = orjson.dumps({"model": t.model, "messages": [{"role": "user", "content": "stream"}],
                                    "max_tokens": 32, "stream": True})
        sent = 0
        res["rss_start_mb"] = rss_mb(proc.pid) if proc else None
        res["latency"] = {}
        for rate in a.rate_list:
            lat = asyncio.run(open_loop(chat, rate, a.duration, body))
            sent += int(lat["n"])
            d = direct_lat.get(str(rate))
            if d is not None:
                lat["added_p50_ms"] = lat["p50_ms"] - d["p50_ms"]
                lat["added_p99_ms"] = lat["p99_ms"] - d["p99_ms"]
            res["latency"][str(rate)] = lat
        cpu0 = cpu_seconds(proc.pid) if proc else 0.0
        w = wrk(chat, a.duration, 16, body, DRIVER_CORE)
        sent += int(w["requests"])
        res["rps"] = w["rps"]
        res["non_2xx"] = w["non_2xx"]
        if proc:
            res["cpu_us_per_request"] = (cpu_seconds(proc.pid) - cpu0) / max(1, w["requests"]) * 1e6
        cpu0 = cpu_seconds(proc.pid) if proc else 0.0
        s = asyncio.run(streams(chat, a.duration, 16, stream_body))
        res["streams_per_s"] = s["streams_per_s"]
        res["stream_errors"] = s["errors"]
        if proc:
            res["cpu_us_per_stream"] = (cpu_seconds(proc.pid) - cpu0) / max(1, s["done"]) * 1e6
        if proc and a.requests:
            for share, key in ((0.2, "rss_at_20pct_mb"), (1.0, "rss_at_end_mb")):
                goal = int(a.requests * share)
                if goal > sent:
                    sent += wrk_requests(chat, goal - sent, 16, body, DRIVER_CORE, w["rps"])
                res[key] = rss_mb(proc.pid)
            res["requests_sent"] = sent
            res["rss_growth_pct"] = (res["rss_at_end_mb"] / res["rss_at_20pct_mb"] - 1) * 100
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if drain is not None:
            drain.wait(10)
    return res


def report(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> None:
    bare = results.get("passthrough", {}).get("rps")
    up = results.get("upstream", {})
    rate = str(a.rate_list[-1]) if a.rate_list else None
    print("\n(shared 2-core machine: other agents' work runs beside this; compare within this run only)")
    print(f"{'target':24} {'req/s':>8} {'x bare':>7} {'streams/s':>9} {'x up':>6} {'cpu us/req':>10} "
          f"{'+p50 ms':>8} {'+p99 ms':>8} {'RSS MB 20%':>10} {'RSS MB end':>10} {'growth':>7}")
    for name, r in results.items():
        lat = r.get("latency", {}).get(rate, {}) if rate else {}

        def f(v: Any, fmt: str) -> str:
            return format(v, fmt) if isinstance(v, int | float) else "-"

        print(f"{name:24} {f(r.get('rps'), '8.0f')} {f(r['rps'] / bare if bare and r.get('rps') else None, '7.2f')} "
              f"{f(r.get('streams_per_s'), '9.0f')} "
              f"{f(r['streams_per_s'] / up['streams_per_s'] if up.get('streams_per_s') else None, '6.2f')} "
              f"{f(r.get('cpu_us_per_request'), '10.0f')} {f(lat.get('added_p50_ms'), '8.2f')} "
              f"{f(lat.get('added_p99_ms'), '8.2f')} {f(r.get('rss_at_20pct_mb'), '10.1f')} "
              f"{f(r.get('rss_at_end_mb'), '10.1f')} {f(r.get('rss_growth_pct'), '6.1f')}%")
    ex = results.get("example")
    if ex and bare:
        lat = ex.get("latency", {}).get("300", {})
        checks = [
            ("req/s >= 85% of the bare pass-through", ex.get("rps", 0) / bare >= 0.85),
            ("streams/s >= 95% of the upstream's", bool(up.get("streams_per_s"))
             and ex.get("streams_per_s", 0) / up["streams_per_s"] >= 0.95),
            ("added p50 <= 0.5 ms and p99 <= 2 ms at 300 req/s", "added_p50_ms" in lat
             and lat["added_p50_ms"] <= 0.5 and lat["added_p99_ms"] <= 2.0),
            (f"RSS <= 150 MB after {a.requests:,} requests", ex.get("rss_at_end_mb", 1e9) <= 150),
            ("RSS growth <= 5% from 20% to 100% of the requests", ex.get("rss_growth_pct", 1e9) <= 5),
        ]
        print(f"\nheadline: the gateway (example config) serves {ex['rps'] / bare:.2f}x the bare pass-through's req/s")
        for text, ok in checks:
            print(f"  target {'met    ' if ok else 'NOT met'}  {text}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all", help=f"comma list of {', '.join((*TARGETS, *FLOORS))}, "
                    "example-granian, example-tracing[-N]; or all (default), or floors (the pass-throughs and the "
                    "gateway on each server)")
    ap.add_argument("--rates", default="300", help="open-loop rates for added latency (req/s)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per latency, wrk and stream phase")
    ap.add_argument("--requests", type=int, default=100_000, help="RSS after this many requests (0: skip)")
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops what this started
    a.rate_list = [int(r) for r in a.rates.split(",") if r]
    names = list(TARGETS) if a.targets == "all" else ["passthrough", *FLOORS, "example", "example-granian"] \
        if a.targets == "floors" else a.targets.split(",")
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (Debian: apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    up_port = free_port()
    up_url = f"http://127.0.0.1:{up_port}"
    helpers = [spawn([sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(up_port), "--model", "m1",
                      "--model", "smollm2", "--model", "sentiment", "--model", "minilm"], DRIVER_CORE)]
    redis_url = None
    if "redis" in names:
        r_port = free_port()
        helpers.append(spawn(["redis-server", "--port", str(r_port), "--save", "", "--appendonly", "no"],
                             DRIVER_CORE))
        redis_url = f"redis://127.0.0.1:{r_port}/0"
    otlp_url = None
    if any(n.startswith("example-tracing") for n in names):
        o_port = free_port()
        helpers.append(spawn([sys.executable, "-m", "loadtests.otlp_sink", "--port", str(o_port), "--count-only"],
                             DRIVER_CORE, stderr=None))
        otlp_url = f"http://127.0.0.1:{o_port}"
    results: dict[str, dict[str, Any]] = {}
    try:
        wait_http(up_url + "/health")
        time.sleep(0.5)
        body = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "say something short"}],
                             "max_tokens": 16})
        direct = {str(rate): asyncio.run(open_loop(up_url + "/v1/chat/completions", rate, a.duration, body))
                  for rate in a.rate_list}
        for t in build_targets(names, up_url, tmp, redis_url, otlp_url):
            results[t.name] = measure(t, a, direct)
            r = results[t.name]
            errors = sum(v.get("errors", 0) for v in r.get("latency", {}).values())
            print(f"{t.name}: {r.get('rps', 0):.0f} req/s (non-2xx {r.get('non_2xx')}), "
                  f"{r.get('streams_per_s', 0):.0f} streams/s (errors {r.get('stream_errors')}), "
                  f"latency errors {errors}, RSS end {r.get('rss_at_end_mb')} MB", flush=True)
    finally:
        for h in helpers:
            h.terminate()
            h.wait(10)
    report(results, a)
    policy = policy_figures()
    print(f"\npolicy evaluation (10 candidates, all rules): p50 {policy['p50_us']:.1f} us, "
          f"p99 {policy['p99_us']:.1f} us")
    if a.out:
        Path(a.out).write_text(json.dumps({"targets": results, "direct_latency": direct, "policy": policy,
                                           "args": {k: v for k, v in vars(a).items()}}, indent=2))


if __name__ == "__main__":
    main()

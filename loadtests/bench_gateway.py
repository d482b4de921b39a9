"""Benchmark: the gateway against the same upstream called directly, in one run.

Measures (gateway pinned to one core; the test upstream and the load driver on the other):
  * added latency p50/p99 at fixed open-loop rates, measured from each request's scheduled send time;
  * the most non-streaming requests/s one gateway worker sustains (wrk, closed loop);
  * the most 32-chunk streams/s (Python driver, 16 concurrent streams);
  * the gateway's CPU time per request (from /proc), for the profile.

    .venv/bin/python loadtests/bench_gateway.py [--rates 50,300,1000] [--duration 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadtests.bench_policy import policy_figures  # noqa: E402
from loadtests.netutil import free_port, wait_http  # noqa: E402

GATEWAY_CORE, OTHER_CORE = "0", "1"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "say something short"}], "max_tokens": 16}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def open_loop(url: str, rate: float, duration: float, body: bytes) -> dict[str, float]:
    """Send at a fixed rate regardless of responses; latency counts from the scheduled send time."""
    n = int(rate * duration)
    latencies: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        # warm the pool
        await asyncio.gather(*(session.post(url, data=body, headers={"Content-Type": "application/json"})
                               for _ in range(8)))
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            nonlocal errors
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)

        await asyncio.gather(*(one(i) for i in range(n)))
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "errors": errors, "n": n}


async def streams(url: str, duration: float, concurrency: int, body: bytes) -> dict[str, float]:
    done = 0
    errors = 0
    stop_at = time.perf_counter() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop_at:
                try:
                    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                        chunks = 0
                        async for line in r.content:
                            if line.startswith(b"data: {"):
                                chunks += 1
                        if r.status == 200 and chunks >= 32:
                            done += 1
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"streams_per_s": done / elapsed, "errors": errors}


def wrk(url: str, duration: float, connections: int, body: bytes) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n'
                'wrk.headers["Content-Type"] = "application/json"\n')
        script = f.name
    out = subprocess.run(["taskset", "-c", OTHER_CORE, "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s",
                          "-s", script, url], capture_output=True, text=True, check=True).stdout
    rps = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("Requests/sec")))
    non2xx = next((int(ln.split()[-1]) for ln in out.splitlines() if "Non-2xx" in ln), 0)
    return {"rps": rps, "non_2xx": non2xx}


def start(cmd: list[str], core: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", core, *cmd], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def redis_figures(a: argparse.Namespace, up_port: int, tmp: Path, plain_url: str, direct: str) -> dict[str, Any]:
    """Redis: a cache hit's latency, and what limits add on the hot path (a second gateway with both)."""
    r_port, g_port = free_port(), free_port()
    redis = start(["redis-server", "--port", str(r_port), "--save", "", "--appendonly", "no"], OTHER_CORE)
    cfg = tmp / "bench-redis.yaml"
    cfg.write_text(f"""
server: {{request_log: "{tmp / 'requests-redis.jsonl'}", health_interval: 5}}
models:
  m1:
    prices: {{prompt_per_1m: 0.1, completion_per_1m: 0.4}}
    deployments: [{{name: fake, url: "http://127.0.0.1:{up_port}", model: m1, max_concurrency: 1024}}]
redis: {{url: "redis://127.0.0.1:{r_port}/0"}}
tenants:
  anonymous: {{limits: {{rpm: 100000000, tpm: 1000000000000, concurrency: 100000, budget_day_usd: 1000000000}}}}
{a.config_extra}
""")
    gw = start([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(g_port),
                "--log-level", "warning"], GATEWAY_CORE)
    out: dict[str, Any] = {}
    try:
        wait_http(f"http://127.0.0.1:{g_port}/healthz")
        limited = f"http://127.0.0.1:{g_port}/v1/chat/completions"
        body = orjson.dumps(CHAT)  # no temperature: not cacheable, so only the limits differ
        hit_body = orjson.dumps({**CHAT, "temperature": 0})
        rate = a.redis_rate
        windows: dict[str, tuple[float, float]] = {}

        def timed(name: str, url: str, b: bytes) -> dict[str, float]:
            t0 = time.time()
            res = asyncio.run(open_loop(url, rate, a.duration, b))
            windows[name] = (t0 + 0.2, time.time())
            return res

        d = asyncio.run(open_loop(direct, rate, a.duration, body))
        p = timed("plain", plain_url, body)
        lim = timed("limits", limited, body)
        hit = timed("hit", limited, hit_body)
        time.sleep(0.5)

        def logged(path: Path, name: str, field: str) -> dict[str, float]:
            lo, hi = windows[name]
            vals = [r[field] for r in map(json.loads, path.read_text().splitlines()) if lo <= r["ts"] <= hi]
            return {"p50_ms": percentile(vals, 50), "p99_ms": percentile(vals, 99), "n": len(vals)}

        # The records' own figures: time in the gateway outside vLLM, free of the load driver's noise.
        inside = {"plain_overhead": logged(tmp / "requests.jsonl", "plain", "overhead_ms"),
                  "limits_overhead": logged(tmp / "requests-redis.jsonl", "limits", "overhead_ms"),
                  "hit_e2e": logged(tmp / "requests-redis.jsonl", "hit", "e2e_ms")}
        out = {"rate": rate, "direct": d, "gateway_plain": p, "gateway_limits": lim, "gateway_cache_hit": hit,
               "limits_added_p50_ms": lim["p50_ms"] - p["p50_ms"], "limits_added_p99_ms": lim["p99_ms"] - p["p99_ms"],
               "records": inside,
               "limits_added_overhead_p50_ms": inside["limits_overhead"]["p50_ms"] - inside["plain_overhead"]["p50_ms"]}
        print(f"redis @ {rate:.0f}/s: direct p50 {d['p50_ms']:.2f} ms; gateway p50 {p['p50_ms']:.2f} ms, with limits "
              f"{lim['p50_ms']:.2f} ms (added {out['limits_added_p50_ms']:.2f} ms p50, "
              f"{out['limits_added_p99_ms']:.2f} ms p99); cache hit (limits on) p50 {hit['p50_ms']:.2f} ms, "
              f"p99 {hit['p99_ms']:.2f} ms; errors {lim['errors'] + hit['errors']}", flush=True)
        print(f"redis, from the records: overhead p50 plain {inside['plain_overhead']['p50_ms']:.3f} ms, with limits "
              f"{inside['limits_overhead']['p50_ms']:.3f} ms (added {out['limits_added_overhead_p50_ms']:.3f} ms); "
              f"cache hit e2e p50 {inside['hit_e2e']['p50_ms']:.3f} ms, p99 {inside['hit_e2e']['p99_ms']:.3f} ms",
              flush=True)
    finally:
        gw.terminate()
        gw.wait()
        redis.terminate()
        redis.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="50,300,1000")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--config-extra", default="", help="YAML merged into the gateway config (e.g. redis)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--redis", action="store_true", help="also measure a cache hit and the limits (redis-server)")
    ap.add_argument("--redis-rate", type=float, default=300.0, help="open-loop rate of the Redis figures")
    a = ap.parse_args()

    up_port, gw_port = free_port(), free_port()
    upstream = start([sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(up_port), "--model", "m1"],
                     OTHER_CORE)
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "bench.yaml"
    cfg.write_text(f"""
server: {{request_log: "{tmp / 'requests.jsonl'}", health_interval: 5}}
models:
  m1:
    prices: {{prompt_per_1m: 0.1, completion_per_1m: 0.4}}
    deployments: [{{name: fake, url: "http://127.0.0.1:{up_port}", model: m1, max_concurrency: 1024}}]
{a.config_extra}
""")
    gateway = start([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(gw_port),
                     "--log-level", "warning"], GATEWAY_CORE)
    results: dict[str, Any] = {"rates": {}}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        via = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        body = orjson.dumps(CHAT)
        stream_body = orjson.dumps({**CHAT, "max_tokens": 32, "stream": True})

        print(f"{'rate':>6} {'direct p50':>11} {'gw p50':>8} {'added p50':>10} {'direct p99':>11} "
              f"{'gw p99':>8} {'added p99':>10} {'errors':>6}")
        for rate in [float(r) for r in a.rates.split(",")]:
            d = asyncio.run(open_loop(direct, rate, a.duration, body))
            g = asyncio.run(open_loop(via, rate, a.duration, body))
            row = {"direct": d, "gateway": g, "added_p50_ms": g["p50_ms"] - d["p50_ms"],
                   "added_p99_ms": g["p99_ms"] - d["p99_ms"]}
            results["rates"][str(int(rate))] = row
            print(f"{rate:6.0f} {d['p50_ms']:11.2f} {g['p50_ms']:8.2f} {row['added_p50_ms']:10.2f} "
                  f"{d['p99_ms']:11.2f} {g['p99_ms']:8.2f} {row['added_p99_ms']:10.2f} {g['errors']:6.0f}",
                  flush=True)

        if shutil.which("wrk"):
            wd = wrk(direct, a.duration, 16, body)
            cpu0 = cpu_seconds(gateway.pid)
            wg = wrk(via, a.duration, 16, body)
            cpu_per_req = (cpu_seconds(gateway.pid) - cpu0) / max(1, wg["rps"] * a.duration)
            results["max_rps"] = {"direct": wd, "gateway": wg, "gateway_cpu_us_per_request": cpu_per_req * 1e6}
            print(f"max non-streaming req/s (wrk, 16 conn): direct {wd['rps']:.0f}, gateway {wg['rps']:.0f} "
                  f"(non-2xx {wg['non_2xx']}); gateway CPU per request {cpu_per_req * 1e6:.0f} us", flush=True)

        sd = asyncio.run(streams(direct, a.duration, 16, stream_body))
        cpu0 = cpu_seconds(gateway.pid)
        sg = asyncio.run(streams(via, a.duration, 16, stream_body))
        cpu_per_stream = (cpu_seconds(gateway.pid) - cpu0) / max(1, sg["streams_per_s"] * a.duration)
        results["streams"] = {"direct": sd, "gateway": sg, "gateway_cpu_us_per_stream": cpu_per_stream * 1e6}
        print(f"32-chunk streams/s (16 concurrent): direct {sd['streams_per_s']:.0f}, "
              f"gateway {sg['streams_per_s']:.0f} (errors {sg['errors']}); "
              f"gateway CPU per stream {cpu_per_stream * 1e6:.0f} us", flush=True)
        if a.redis:
            results["redis"] = redis_figures(a, up_port, tmp, via, direct)
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait()
        upstream.wait()
    policy = policy_figures()
    results["policy"] = policy
    print(f"policy evaluation (10 candidates, all rules): p50 {policy['p50_us']:.1f} us, "
          f"p99 {policy['p99_us']:.1f} us")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

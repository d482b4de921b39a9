"""Soak test: hours-style load compressed into a bounded run, watching the gateway for leaks.

Drives mixed traffic (streaming and not, chat/completions/embeddings, repeated prompts that hit the
cache, some bad requests and client disconnects) at a fixed concurrency against the test upstream,
and samples the gateway's own /metrics every interval: resident memory, open file descriptors and
live asyncio tasks. Growth is measured from the first sample after warm-up to the last.

    .venv/bin/python -m loadtests.soak --minutes 30 [--redis-url redis://127.0.0.1:6379/9] [--out FILE.json]

Exit status 1 when memory grew more than --max-growth (default 5%) or fds/tasks grew, or any
request failed unexpectedly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent

from loadtests.netutil import free_port, wait_http  # noqa: E402


def sample(text: str) -> dict[str, float]:
    wanted = {"process_resident_memory_bytes", "process_open_fds", "gateway_asyncio_tasks"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


async def drive(url: str, stop_at: float, concurrency: int, seed: int, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    repeated = [f"Repeated question number {i}?" for i in range(20)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            kind = rng.random()
            stream = rng.random() < 0.5
            if kind < 0.6:
                content = rng.choice(repeated) if rng.random() < 0.3 else f"prompt {rng.random()} " * rng.randint(1, 40)
                body: Any = {"model": "m1", "messages": [{"role": "user", "content": content}],
                             "max_tokens": rng.randint(1, 32), "stream": stream, "temperature": 0}
                path = "/v1/chat/completions"
            elif kind < 0.8:
                body = {"model": "m1", "prompt": "once upon a time " * rng.randint(1, 10), "max_tokens": 8,
                        "stream": stream, "seed": 7}
                path = "/v1/completions"
            elif kind < 0.95:
                body = {"model": "m1", "input": [f"text {i}" for i in range(rng.randint(1, 4))]}
                path, stream = "/v1/embeddings", False
            else:
                body, path, stream = b"{broken json", "/v1/chat/completions", False
            data = body if isinstance(body, bytes) else orjson.dumps(body)
            disconnect_early = stream and rng.random() < 0.05
            try:
                async with session.post(url + path, data=data, headers={"Content-Type": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if disconnect_early:
                        await r.content.readline()
                        r.close()
                        counts["disconnected"] += 1
                        return
                    await r.read()
                    if isinstance(body, bytes):
                        counts["bad_ok" if r.status == 400 else "unexpected"] += 1
                    else:
                        counts["ok" if r.status == 200 else "unexpected"] += 1
            except (TimeoutError, aiohttp.ClientError):
                counts["client_errors"] += 1

        async def worker() -> None:
            while time.monotonic() < stop_at:
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def main_async(a: argparse.Namespace) -> int:
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(up_port),
                                 "--model", "m1", "--itl-ms", "1"], cwd=ROOT, stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "soak.yaml"
    redis = f'redis: {{url: "{a.redis_url}"}}' if a.redis_url else ""
    cfg.write_text(f"""
server: {{request_log: "{tmp / 'requests.jsonl'}"}}
{redis}
models:
  m1:
    prices: {{prompt_per_1m: 0.1, completion_per_1m: 0.4}}
    deployments: [{{name: fake, url: "http://127.0.0.1:{up_port}", model: m1}}]
{a.config_extra}
""")
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port",
                                str(gw_port), "--log-level", "warning"], cwd=ROOT)
    url = f"http://127.0.0.1:{gw_port}"
    samples: list[dict[str, float]] = []
    counts = {k: 0 for k in ("ok", "bad_ok", "disconnected", "unexpected", "client_errors")}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health")
        wait_http(f"{url}/healthz")
        t0 = time.monotonic()
        stop_at = t0 + a.minutes * 60
        load = asyncio.create_task(drive(url, stop_at, a.concurrency, a.seed, counts))
        async with aiohttp.ClientSession() as s:
            while not load.done():
                await asyncio.sleep(min(a.interval, max(0.1, stop_at - time.monotonic())))
                async with s.get(f"{url}/metrics") as r:
                    figures = sample(await r.text())
                figures["minute"] = (time.monotonic() - t0) / 60
                figures["requests"] = sum(counts.values())
                samples.append(figures)
                print(f"{figures['minute']:6.1f} min  rss {figures['process_resident_memory_bytes'] / 2**20:7.1f} MiB"
                      f"  fds {figures['process_open_fds']:4.0f}  tasks {figures['gateway_asyncio_tasks']:4.0f}"
                      f"  requests {figures['requests']}", flush=True)
        await load
        await asyncio.sleep(1.0)  # let in-flight work settle, then the final sample
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            final = sample(await r.text())
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait()
        upstream.wait()
    warm = next((x for x in samples if x["minute"] >= a.warmup_minutes), samples[0])
    growth = final["process_resident_memory_bytes"] / warm["process_resident_memory_bytes"] - 1
    result = {"minutes": a.minutes, "concurrency": a.concurrency, "counts": counts, "samples": samples,
              "final": final, "rss_growth_after_warmup": growth,
              "fds_warm": warm["process_open_fds"], "fds_final": final["process_open_fds"],
              "tasks_warm": warm["gateway_asyncio_tasks"], "tasks_final": final["gateway_asyncio_tasks"]}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    ok = (growth <= a.max_growth and final["process_open_fds"] <= warm["process_open_fds"]
          and final["gateway_asyncio_tasks"] <= warm["gateway_asyncio_tasks"]
          and counts["unexpected"] == 0 and counts["client_errors"] == 0)
    print("SOAK", "PASSED" if ok else "FAILED", f"rss growth {growth:+.2%}")
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup-minutes", type=float, default=2)
    ap.add_argument("--interval", type=float, default=60, help="seconds between samples")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--redis-url", default=os.environ.get("SOAK_REDIS_URL", ""))
    ap.add_argument("--config-extra", default="", help="YAML appended to the gateway config (cache, limits)")
    ap.add_argument("--out")
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()

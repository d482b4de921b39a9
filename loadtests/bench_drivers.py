"""Load drivers and process probes for bench_gateway.py: open-loop latency, streams, wrk, CPU and RSS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (granian serves from a worker process it spawns)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of the process and its descendants."""
    kb = 0
    for p in process_tree(pid):
        try:
            kb += next(int(ln.split()[1]) for ln in Path(f"/proc/{p}/status").read_text().splitlines()
                       if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return kb / 1024


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


async def open_loop(url: str, rate: float, duration: float, body: bytes) -> dict[str, float]:
    """Send at a fixed rate regardless of responses; latency counts from the scheduled send time."""
    n = int(rate * duration)
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(8):  # warm the pool
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            nonlocal errors
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)

        await asyncio.gather(*(one(i) for i in range(n)))
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "errors": errors, "n": n + 8}


async def streams(url: str, duration: float, concurrency: int, body: bytes) -> dict[str, float]:
    """Closed loop: `concurrency` clients each reading whole 32-chunk streams, for `duration` seconds."""
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
    return {"streams_per_s": done / elapsed, "done": done, "errors": errors}


def wrk_requests(url: str, requests: int, connections: int, body: bytes, core: str, rps_hint: float) -> int:
    """Send about `requests` requests with wrk, in runs of at most a minute sized by the rate seen so far."""
    sent = 0
    rps = max(100.0, rps_hint)
    while sent < requests:
        w = wrk(url, min(60.0, max(1.0, (requests - sent) / rps)), connections, body, core)
        sent += int(w["requests"])
        rps = max(100.0, w["rps"])
    return sent


def wrk(url: str, duration: float, connections: int, body: bytes, core: str) -> dict[str, float]:
    """wrk, one thread, closed loop, for `duration` seconds (whole seconds, at least 1)."""
    script = (f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n'
              'wrk.headers["Content-Type"] = "application/json"\n')
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(["taskset", "-c", core, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
                              "-s", f.name, url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    rps = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("Requests/sec")))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = next((int(ln.split()[-1]) for ln in out.splitlines() if "Non-2xx" in ln), 0)
    return {"rps": rps, "requests": total, "non_2xx": non2xx}

"""Real vLLM: completion tokens/s direct vs through the gateway, same concurrency, in one run.

Starts the local CPU chat engine (deploy/local/engines.py, model `smollm2`) and one gateway in front of it,
then runs the same closed-loop load (C concurrent streams, fixed prompts, max_tokens with ignore_eos so
every answer has the same length) in alternating rounds: direct, through the gateway, direct, ... (so
drift on a shared machine hits both alike). Tokens are counted from vLLM's own `usage`; the figure is
the sum of tokens over the sum of round times, per path.

    python -m loadtests.bench_vllm [--concurrency 4] [--rounds 3] [--duration 10] [--max-tokens 32] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtests.netutil import free_port, wait_http
from loadtests.run import ROOT


async def closed_loop(url: str, concurrency: int, duration: float, max_tokens: int,
                      stream_options: dict[str, bool] | None = None) -> dict[str, Any]:
    tokens = requests = errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal tokens, requests, errors
        n = 0
        while time.perf_counter() < stop_at:
            body = {"model": "smollm2", "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                    "temperature": 0.7, "stream_options": stream_options or {"include_usage": True},
                    "messages": [{"role": "user", "content": f"Worker {i} request {n}: write about the sea."}]}
            n += 1
            try:
                async with session.post(url, data=orjson.dumps(body),
                                        headers={"Content-Type": "application/json"}) as r:
                    got = 0
                    async for line in r.content:
                        if line.startswith(b"data: {") and b'"usage"' in line:
                            u = orjson.loads(line[6:]).get("usage")
                            if u:
                                got = u["completion_tokens"]
                    if r.status == 200 and got:
                        tokens += got
                        requests += 1
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "requests": requests, "errors": errors, "elapsed_s": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per path, alternating")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import subprocess

    from deploy.local import engines

    engines.ensure_ready(verbose=False)
    port, gw_port = free_port(), free_port()
    t0 = time.monotonic()
    chat = engines.start_chat_engine(port)
    gateway = None
    try:
        engine = f"http://127.0.0.1:{port}"
        engines.wait_healthy(engine, timeout=600, proc=chat)
        print(f"engine healthy after {time.monotonic() - t0:.0f} s", flush=True)
        tmp = Path(tempfile.mkdtemp())
        cfg = tmp / "gw.yaml"
        cfg.write_text(f"""
server: {{request_log: "{tmp / 'requests.jsonl'}"}}
models:
  smollm2:
    cost_basis: {{gpu_usd_per_hour: 2.0}}
    deployments: [{{name: smollm2-0, url: "{engine}", model: smollm2,
                   timeouts: {{first_token: 300, total: 600}}}}]
""")
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port",
                                    str(gw_port), "--log-level", "warning"], cwd=ROOT)
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", proc=gateway)
        direct, via = f"{engine}/v1/chat/completions", f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        asyncio.run(closed_loop(direct, a.concurrency, 5, a.max_tokens))  # warm-up
        rounds: list[dict[str, Any]] = []
        for i in range(a.rounds * 2):
            label, url = ("direct", direct) if i % 2 == 0 else ("gateway", via)
            # direct requests carry the stream_options the gateway sends upstream, so vLLM does the same work
            opts = {"include_usage": True, "continuous_usage_stats": True} if label == "direct" else None
            r = asyncio.run(closed_loop(url, a.concurrency, a.duration, a.max_tokens, opts))
            rounds.append({"path": label, **r})
            print(f"round {i + 1}: {label:8} {r['tokens_per_s']:8.1f} tok/s  ({r['requests']} requests, "
                  f"{r['errors']} errors)", flush=True)
        totals = {}
        for path in ("direct", "gateway"):
            rs = [r for r in rounds if r["path"] == path]
            totals[path] = sum(r["tokens_per_s"] * r["elapsed_s"] for r in rs) / sum(r["elapsed_s"] for r in rs)
        ratio = totals["gateway"] / totals["direct"] if totals["direct"] else float("nan")
        print(f"direct {totals['direct']:.1f} tok/s, through the gateway {totals['gateway']:.1f} tok/s: "
              f"{ratio:.1%} of direct (concurrency {a.concurrency}, target >= 98%)")
        if a.out:
            a.out.write_text(json.dumps({"concurrency": a.concurrency, "rounds": rounds, "tokens_per_s": totals,
                                         "ratio": ratio}, indent=2))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait()
        engines.stop(chat)


if __name__ == "__main__":
    main()

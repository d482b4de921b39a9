"""LoRA adapters on demand: LRU-by-use placement vs random placement, side by side (issue 25).

Zipf-distributed traffic over `--adapters` catalogue adapters (the trained `sentiment` one and untrained
ones made with PEFT, deploy/local/make_adapters.py) on one real vLLM CPU engine that may hold fewer
(`--slots`, also its --max-loras). The engine is started by this script with runtime LoRA loading
(VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and no adapter at start, unless `--url` names a running one.
For each policy (adapter_placement.policy: lru, then random) a fresh gateway runs the same seeded request
sequence after every adapter was unloaded from the engine; `--concurrency` streams in flight,
`--max-tokens` tokens each. Printed per policy: cold loads per 1,000 requests (gateway_adapter_loads_total),
evictions, TTFT p50/p95 (client-side, first content chunk), and the mean adapter_load_ms of the
requests that waited for a load. `--fake` runs the same against the test upstream (loads take
--fake-load-ms) in seconds, to check the script.

    flock /tmp/vllm-engine.lock .venv/bin/python -m loadtests.bench_adapters [--requests 600] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.netutil import free_port, wait_http
from loadtests.run import ROOT

sys.path.insert(0, str(ROOT))
from deploy.local import engines  # noqa: E402


def zipf_sequence(names: list[str], n: int, s: float, seed: int) -> list[str]:
    """n adapter names drawn with P(rank k) ~ 1/k^s; which adapter has which rank is seeded too."""
    rng = random.Random(seed)
    ranked = names[:]
    rng.shuffle(ranked)
    weights = [1.0 / (k ** s) for k in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights, k=n)


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def unload_all(url: str, names: set[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        data = (await c.get(f"{url}/v1/models")).json()["data"]
        for m in data:
            if m.get("parent") and m["id"] in names:
                await c.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": m["id"]})


async def drive(gw_url: str, sequence: list[str], concurrency: int, max_tokens: int,
                prompt: str) -> list[dict[str, Any]]:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, name in enumerate(sequence):
        queue.put_nowait((i, name))
    results: list[dict[str, Any]] = []

    async def worker(c: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, name = queue.get_nowait()
            body = {"model": name, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": prompt.format(text=f"review number {i}")}]}
            t0 = time.perf_counter()
            ttft = None
            async with c.stream("POST", f"{gw_url}/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if ttft is None and line.startswith("data: {") and _content(line[6:]):
                        ttft = time.perf_counter() - t0
                results.append({"adapter": name, "status": r.status_code, "ttft_s": ttft,
                                "e2e_s": time.perf_counter() - t0, "load": r.headers.get("x-gateway-adapter-load"),
                                "load_ms": float(r.headers.get("x-gateway-adapter-load-ms") or 0)})

    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return results


def _content(payload: str) -> str:
    choices = json.loads(payload).get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def gateway_config(engine_urls: list[str], adapters: dict[str, str], slots: int, policy: str,
                   upstream_model: str, replicate: int | None = None) -> dict[str, Any]:
    return {
        "models": {"base": {"deployments": [{"name": f"engine-{i}", "url": u, "model": upstream_model,
                                             "adapter_slots": slots, "max_concurrency": 64,
                                             "timeouts": {"connect": 2, "first_token": 300, "total": 600}}
                                            for i, u in enumerate(engine_urls)]}},
        "adapters": {n: {"base": "base", "path": p} for n, p in adapters.items()},
        "adapter_placement": {"policy": policy, "sync_interval_s": 3600, "replicate_in_flight": replicate},
        "server": {"request_log": "off", "queue_timeout": 300},
        "cache": {"mode": "off"},
    }


def run_policy(policy: str, engine_urls: list[str], adapters: dict[str, str], a: argparse.Namespace, tmp: Path,
               upstream_model: str, sequence: list[str], prompt: str) -> dict[str, Any]:
    for u in engine_urls:
        asyncio.run(unload_all(u, set(adapters)))
    cfg_path = tmp / f"gw-{policy}.yaml"
    cfg_path.write_text(yaml.safe_dump(gateway_config(engine_urls, adapters, a.slots, policy, upstream_model,
                                                      a.replicate or None)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg_path), "--port",
                             str(port), "--workers", "1", "--log-level", "warning"], cwd=ROOT,
                            env={**os.environ, "GATEWAY_STATE_DIR": str(tmp / f"state-{policy}")})  # its own ledger
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", timeout=300, proc=proc)  # a loaded machine starts it slowly
        t0 = time.perf_counter()
        results = asyncio.run(drive(url, sequence, a.concurrency, a.max_tokens, prompt))
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(15)
    ok = [r for r in results if r["status"] == 200 and r["ttft_s"] is not None]
    ttfts = [r["ttft_s"] * 1e3 for r in ok]
    waited = [r["load_ms"] for r in results if r["load"] in ("cold", "joined", "reload", "replica")]
    loads = metric_sum(metrics, "gateway_adapter_loads_total")
    return {"policy": policy, "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 1),
            "cold_loads": int(loads), "cold_loads_per_1000": round(1000 * loads / max(1, len(results)), 1),
            "evictions": int(metric_sum(metrics, "gateway_adapter_evictions_total")),
            "ttft_p50_ms": round(pct(ttfts, 0.5), 1), "ttft_p95_ms": round(pct(ttfts, 0.95), 1),
            "ttft_mean_ms": round(statistics.fmean(ttfts), 1) if ttfts else None,
            "requests_waiting_for_a_load": len(waited),
            "adapter_load_ms_mean": round(statistics.fmean(waited), 1) if waited else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=9, help="catalogue size: sentiment + N-1 untrained (>= 8)")
    p.add_argument("--slots", type=int, default=2, help="adapters each engine may hold (also its --max-loras)")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s: P(rank k) ~ 1/k^s")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--replicate", type=int, default=2, help="adapter_placement.replicate_in_flight (0: off)")
    p.add_argument("--engines", type=int, default=2, help="engines started (each holds --slots adapters)")
    p.add_argument("--url", action="append", help="a running engine with runtime LoRA loading, repeatable "
                   "(default: start --engines)")
    p.add_argument("--fake", action="store_true", help="the test upstream instead of vLLM (checks the script)")
    p.add_argument("--fake-load-ms", type=float, default=200.0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    n_engines = len(a.url) if a.url else a.engines
    if a.adapters < 2 or a.slots * n_engines >= a.adapters:
        p.error("need fewer slots (--slots x engines) than --adapters")
    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    if a.fake:
        adapters = {f"lora-{i:02d}": str(tmp / f"lora-{i:02d}") for i in range(a.adapters)}
        for d in adapters.values():
            Path(d).mkdir()
        for _ in range(a.engines):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(port),
                                           "--model", "base-model", "--ttft-ms", "30", "--itl-ms", "5"], cwd=ROOT))
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(f"{urls[-1]}/health", proc=procs[-1])
            httpx.post(f"{urls[-1]}/control", json={"load_ms": a.fake_load_ms}, timeout=5)
        upstream_model, prompt = "base-model", "Classify: {text}"
    else:
        engines.ensure_ready(verbose=False)
        m = engines.manifest()
        adapters = {"sentiment": m["lora_modules"]["sentiment"], **engines.untrained_adapters(a.adapters - 1)}
        upstream_model, prompt = "smollm2", m["sentiment_prompt"]
        if a.url:
            urls = list(a.url)
        else:
            for _ in range(a.engines):
                port = free_port()
                procs.append(engines.start_chat_engine(port, static_loras=False,
                                                       env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
                                                       extra_args=["--max-loras", str(a.slots)]))
                urls.append(f"http://127.0.0.1:{port}")
            for u, pr in zip(urls, procs, strict=True):
                engines.wait_healthy(u, timeout=900, proc=pr)
    sequence = zipf_sequence(sorted(adapters), a.requests, a.zipf, a.seed)
    try:
        if not a.fake:  # vLLM's first LoRA request compiles kernels: once per engine, before either policy
            for u in urls:
                _warm(u, adapters)
        rows = [run_policy(policy, urls, adapters, a, tmp, upstream_model, sequence, prompt)
                for policy in ("lru", "random")]
    finally:
        for pr in procs:
            if a.fake:
                pr.terminate()
                pr.wait(10)
            else:
                engines.stop(pr)
    share = {n: round(sequence.count(n) / len(sequence), 3) for n in sorted(set(sequence), key=sequence.count,
                                                                            reverse=True)}
    setup = {"engine": "fake" if a.fake else "vLLM CPU (SmolLM2-135M)", "engines": len(urls),
             "adapters": a.adapters, "slots_per_engine": a.slots,
             "requests": a.requests, "concurrency": a.concurrency, "max_tokens": a.max_tokens, "zipf_s": a.zipf,
             "seed": a.seed, "traffic_share": share}
    print(json.dumps(setup))
    print("| placement | cold loads / 1,000 req | evictions | TTFT p50 ms | TTFT p95 ms | TTFT mean ms | "
          "req. waiting for a load | their adapter_load_ms (mean) | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['cold_loads_per_1000']} ({r['cold_loads']}) | {r['evictions']} | "
              f"{r['ttft_p50_ms']} | {r['ttft_p95_ms']} | {r['ttft_mean_ms']} | {r['requests_waiting_for_a_load']} | "
              f"{r['adapter_load_ms_mean']} | {r['errors']} |")
    if a.out:
        a.out.write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    return 0


def _warm(url: str, adapters: dict[str, str]) -> None:
    """One request on one adapter straight to the engine (vLLM's first LoRA request compiles kernels)."""
    name, path = next(iter(adapters.items()))
    httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)
    httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})


if __name__ == "__main__":
    sys.exit(main())

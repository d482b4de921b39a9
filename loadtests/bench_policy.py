"""Benchmark: the plan stage's cost per request, 10 candidates, every rule enabled (in-process, no I/O).

    .venv/bin/python -m loadtests.bench_policy [--n 20000]

Rules exercised on every request: task (a task the route maps), budget pressure (the tenant is over the
threshold, so candidates are re-sorted by price), context length (the byte bound decides: no
tokenizer call), overload (live vLLM figures on every deployment, the first candidate overloaded) and
deadline (live latency figures, predictions for all 10 candidates).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from gateway.config import parse_config  # noqa: E402
from gateway.routing.breaker import CircuitBreaker  # noqa: E402
from gateway.routing.live import LiveStats  # noqa: E402
from gateway.routing.policy import Planner  # noqa: E402

N_CANDIDATES = 10


def build() -> tuple[Planner, dict[str, Any]]:
    models = "\n".join(
        f"  m{i}: {{prices: {{prompt_per_1m: {10 - i}, completion_per_1m: {20 - i}}}, context_window: 8192, "
        f"deployments: [{{name: d{i}a, url: 'http://h{i}:1', model: m{i}}}, {{name: d{i}b, url: 'http://h{i}:2', "
        f"model: m{i}}}]}}" for i in range(N_CANDIDATES))
    text = f"""
models:
{models}
routes:
  r:
    candidates: [{', '.join(f'm{i}' for i in range(N_CANDIDATES))}]
    tasks: {{classification: m7}}
    budget_pressure: {{threshold: 0.5}}
    overload: {{max_waiting: 4, max_kv_cache: 0.9, max_in_flight: 100}}
    deadline: {{default_ms: 800}}
"""
    cfg = parse_config(text, "bench", env={})
    live = LiveStats(cfg)
    for i in range(N_CANDIDATES):
        for suffix in "ab":
            d = live.get(f"d{i}{suffix}")
            d.waiting, d.running, d.kv_cache = (10.0 if i == 7 else 1.0), 4.0, 0.3
            d.observe(0.05 * (i + 1), 0.004 * (i + 1))
    breakers = {name: CircuitBreaker(name, cfg.circuit_breaker) for name in live.by_deployment}
    planner = Planner(cfg, live, breakers, budget_fraction=lambda _t: 0.9, in_flight=lambda _d: 3)
    body = {"model": "r", "messages": [{"role": "user", "content": "Classify: great product, works well."}],
            "max_tokens": 64}
    return planner, body


async def run(n: int) -> list[float]:
    planner, body = build()

    async def never(_m: Any, _b: Any) -> None:
        raise AssertionError("the byte bound should decide")

    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        plan = await planner.plan("r", body, "tenant", "classification", None, never)
        samples.append(time.perf_counter() - t0)
    assert plan.decisions, "every rule should have had its say"
    return samples


def policy_figures(n: int = 20000) -> dict[str, float]:
    samples = asyncio.run(run(n))[n // 10:]  # drop warm-up
    s = sorted(samples)
    return {"p50_us": statistics.median(s) * 1e6, "p99_us": s[int(0.99 * len(s))] * 1e6, "n": len(s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    f = policy_figures(ap.parse_args().n)
    print(f"policy evaluation, {N_CANDIDATES} candidates, all rules: p50 {f['p50_us']:.1f} us, "
          f"p99 {f['p99_us']:.1f} us ({f['n']:.0f} plans)")


if __name__ == "__main__":
    main()

"""Gateway-only capacity: the rate where the gateway's added p99 passes 5 ms, and the highest error-free rate.

The test upstream and this driver run on one core, the gateway (one worker) is pinned to the other with
taskset. For each open-loop rate (requests sent on schedule whatever the answers; latency counts from the
scheduled send time, so queueing shows) the same load goes first to the upstream directly, then through the
gateway; added p99 = gateway p99 - direct p99. A rate is "sustained" when it has no errors and the
gateway's p99 stays under 1 s (the queue is not growing). Non-streaming (16 tokens) and streaming
(32 chunks, timed to the last byte) separately; the gateway's peak RSS (VmHWM) at the end.

    python -m loadtests.capacity [--rates 100,200,400,600,800,1000] [--duration 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from loadtests.bench_gateway import CHAT, GATEWAY_CORE, OTHER_CORE, open_loop, start
from loadtests.netutil import free_port, wait_http
from loadtests.run import peak_rss_mib

ADDED_P99_LIMIT_MS = 5.0
SUSTAINED_P99_LIMIT_MS = 1000.0


def sweep(direct: str, via: str, body: bytes, rates: list[float], duration: float, label: str) -> dict[str, Any]:
    rows = []
    knee = sustained = None
    print(f"{label}: {'rate':>6} {'direct p99':>10} {'gw p50':>7} {'gw p99':>8} {'added p99':>9} {'errors':>6}",
          flush=True)
    for rate in rates:
        d = asyncio.run(open_loop(direct, rate, duration, body))
        g = asyncio.run(open_loop(via, rate, duration, body))
        added = g["p99_ms"] - d["p99_ms"]
        ok = g["errors"] == 0 and g["p99_ms"] < SUSTAINED_P99_LIMIT_MS
        rows.append({"rate": rate, "direct": d, "gateway": g, "added_p99_ms": added, "sustained": ok})
        print(f"{label}: {rate:6.0f} {d['p99_ms']:10.2f} {g['p50_ms']:7.2f} {g['p99_ms']:8.2f} {added:9.2f} "
              f"{g['errors']:6.0f}", flush=True)
        if knee is None and added > ADDED_P99_LIMIT_MS:
            knee = rate
        if ok:
            sustained = rate
        else:
            break
    return {"rows": rows, "added_p99_over_5ms_at_rate": knee, "max_sustained_rate": sustained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100,200,400,600,800,1000,1200,1500")
    ap.add_argument("--stream-rates", default="50,100,200,300,400,500,600")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    os.sched_setaffinity(0, {int(OTHER_CORE)})  # the driver shares the upstream's core, not the gateway's

    up_port, gw_port = free_port(), free_port()
    upstream = start([sys.executable, "-m", "gateway.testing.fake_vllm", "--port", str(up_port), "--model", "m1"],
                     OTHER_CORE)
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "capacity.yaml"
    cfg.write_text(f"""
server: {{request_log: "{tmp / 'requests.jsonl'}", health_interval: 5}}
models:
  m1:
    prices: {{prompt_per_1m: 0.1, completion_per_1m: 0.4}}
    deployments: [{{name: fake, url: "http://127.0.0.1:{up_port}", model: m1, max_concurrency: 4096}}]
""")
    gateway = start([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(gw_port),
                     "--log-level", "warning"], GATEWAY_CORE)
    out: dict[str, Any] = {}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        via = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        rates = [float(r) for r in a.rates.split(",")]
        out["non_streaming"] = sweep(direct, via, orjson.dumps(CHAT), rates, a.duration, "non-streaming")
        srates = [float(r) for r in a.stream_rates.split(",")]
        out["streaming"] = sweep(direct, via, orjson.dumps({**CHAT, "max_tokens": 32, "stream": True}), srates,
                                 a.duration, "streaming")
        out["gateway_peak_rss_mib"] = peak_rss_mib(gateway.pid)
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait()
        upstream.wait()
    for k in ("non_streaming", "streaming"):
        r = out[k]
        print(f"{k}: added p99 > {ADDED_P99_LIMIT_MS} ms from {r['added_p99_over_5ms_at_rate']} req/s; "
              f"highest sustained rate without errors {r['max_sustained_rate']} req/s")
    print(f"gateway peak RSS {out['gateway_peak_rss_mib']:.1f} MiB")
    if a.out:
        a.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

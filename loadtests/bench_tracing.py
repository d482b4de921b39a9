"""Benchmark: the CPU that tracing adds to one request, in-process (steadier than req/s on a shared machine).

Runs the span calls of one non-streaming request answered by its first attempt after a cache miss
(server, admission, cache and attempt spans) N times against the real SDK pipeline (BatchSpanProcessor,
OTLP/HTTP exporter)
posting to a receiver in another process, and reports process CPU per request (all threads: the
export thread's protobuf encoding included) and the spans the receiver got.

    .venv/bin/python -m loadtests.bench_tracing [--requests 1000] [--sample-ratio 1.0] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import parse_config  # noqa: E402
from gateway.record import Attempt, RequestRecord  # noqa: E402
from gateway.tracing import build_tracing  # noqa: E402
from loadtests.netutil import free_port  # noqa: E402

CONFIG = """
models:
  m1:
    prices: {prompt_per_1m: 1.0, completion_per_1m: 2.0}
    deployments: [{name: m1-a, url: "http://127.0.0.1:9", model: m1}]
tracing: {otlp_endpoint: "%s", sample_ratio: %s}
"""
BODY = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0.0}
HEADERS = {b"authorization": b"Bearer k"}


def one_request(tracing: object, i: int) -> None:
    rec = RequestRecord(f"r{i}", "chat")
    tracing.begin(rec, HEADERS, "POST", "/v1/chat/completions")  # type: ignore[attr-defined]
    t = rec.trace
    assert t is not None
    t.stage("gateway.admit")
    rec.identity.tenant = "team-a"
    rec.identity.requested_model = "m1"
    t.request(rec, BODY)
    t0 = t.lookup_starts()
    rec.end.cache = "miss"
    t.looked_up(rec, t0)
    att = Attempt("m1-a", "m1", "ok", 0.0, public_model="m1")
    span = t.start_attempt(att, 1, "m1")
    if span is not None:
        t.answered(span, False)
    rec.routing.attempts.append(att)
    rec.routing.served_model, rec.routing.deployment, rec.routing.upstream_model = "m1", "m1-a", "m1"
    rec.usage.prompt_tokens, rec.usage.completion_tokens, rec.usage.usage_reported = 12, 16, True
    rec.end.status = 200
    rec.finish()
    t.end(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000,
                    help="more than the batch queue holds (2048 spans) outruns the exporter: spans are dropped")
    ap.add_argument("--sample-ratio", type=float, default=1.0)
    ap.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    a = ap.parse_args()
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "loadtests.otlp_sink", "--port", str(port), "--count-only"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    try:
        tracing = build_tracing(parse_config(CONFIG % (f"http://127.0.0.1:{port}", a.sample_ratio), "bench"))
        assert tracing is not None
        for i in range(500):  # warm up
            one_request(tracing, i)
        tracing.provider.force_flush(30_000)  # the warm-up's spans are exported before the clock starts
        prof = cProfile.Profile() if a.profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        for i in range(a.requests):
            one_request(tracing, i)
        if prof:
            prof.disable()
        cpu_calls, wall_calls = time.process_time() - cpu0, time.perf_counter() - wall0
        tracing.provider.force_flush(30_000)  # the export thread's encoding and posting, counted too
        cpu_all = time.process_time() - cpu0
        tracing.shutdown()
    finally:
        sink.terminate()
        _, err = sink.communicate(timeout=10)
    n = a.requests
    print(f"sample ratio {a.sample_ratio:g}, requests {n}: in the request path {cpu_calls / n * 1e6:.1f} us CPU "
          f"({wall_calls / n * 1e6:.1f} us wall), "
          f"with export {cpu_all / n * 1e6:.1f} us CPU per request; receiver: {err.strip()}")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()

"""Smoke run of one load-test scenario against the test upstream: report, CSV and custom stats are written."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

# locust is run in its own process (importing it here would monkey-patch pytest's process with gevent)
if importlib.util.find_spec("locust") is None or importlib.util.find_spec("matplotlib") is None:
    pytest.skip("needs the load extras: pip install -e '.[load]'", allow_module_level=True)

from loadtests import prompts  # noqa: E402
from loadtests.run import run  # noqa: E402
from tests.conftest import FakeUpstream  # noqa: E402

BIN = Path(sys.executable).parent


def test_prompt_file_is_repeatable(tmp_path: Path) -> None:
    a, b = prompts.make(tmp_path / "a.jsonl", seed=3), prompts.make(tmp_path / "b.jsonl", seed=3)
    assert a.read_bytes() == b.read_bytes()
    rows = prompts.load(a)
    assert {k for k, v in rows.items() if v} == set(prompts.KINDS)
    longs = [len(str(r["text"]).split()) for r in rows["long"]]
    shorts = sorted(len(str(r["text"]).split()) for r in rows["short"])
    assert min(longs) >= 300 and shorts[len(shorts) // 2] < 100


def test_steady_scenario_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("steady", "fake", users=4, duration=8, max_requests=0, seed=1, out=out)

    for name in ("report.md", "latency.png", "throughput.png", "rates.png", "cost.png", "locust_stats.csv",
                 "locust_stats_history.csv", "locust.html", "records.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert result["requests"] > 5 and result["errors"] == 0

    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader((out / "locust_stats.csv").open())}
    ttft = rows[("TTFT", "big")]
    assert int(ttft["Request Count"]) > 0
    # the fake's large model answers after 40 ms; through the gateway, on a busy CI box, within 5 s
    assert 30 <= float(ttft["Median Response Time"]) < 5000
    cost = rows[("COST", "big")]
    assert int(cost["Request Count"]) > 0 and float(cost["Average Response Time"]) > 0  # micro-USD
    assert ("POST", "chat stream") in rows and ("POST", "embeddings") in rows
    assert ("COST", "nlu") in rows  # classification went to the adapter through task routing

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    streamed = [r for r in records if r["stream"] and r["ok"]]
    assert streamed and all(r["cost_usd"] > 0 or r.get("cache") == "hit" for r in streamed)
    assert all(r["ttft_ms"] <= r["e2e_ms"] for r in streamed)
    report = (out / "report.md").read_text()
    assert "**Summary:** steady (fake):" in report and "![latency](latency.png)" in report


def _report(out: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], str]:
    for name in ("report.md", "latency.png", "locust_stats.csv", "locust.html", "records.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "meta.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), meta, records, (out / "report.md").read_text()


def test_overload_scenario_smoke(tmp_path: Path) -> None:
    result = run("overload", "fake", users=12, duration=6, max_requests=0, seed=1, out=tmp_path)
    summary, _, records, report = _report(tmp_path)
    assert result["requests"] > 20 and result["errors"] == 0
    # the large model (capacity 4) fills up: the overload rule moves new requests to the small model
    assert summary["fallback_rate"] > 0 and summary["by_model"]["small"]["requests"] > 0
    assert {r["rule"] for r in records if r.get("served_model") == "small"} == {"overload"}
    assert "**Summary:** overload (fake):" in report


def test_cache_scenario_smoke(tmp_path: Path) -> None:
    result = run("cache", "fake", users=6, duration=6, max_requests=0, seed=1, out=tmp_path)
    summary, _, records, _ = _report(tmp_path)
    assert result["requests"] > 10 and result["errors"] == 0
    hits = [r for r in records if r.get("cache") == "hit"]
    assert hits and summary["cache_hit_rate"] > 0 and summary["saved_usd"] > 0
    assert all(r["cost_usd"] == 0 for r in hits)  # a hit costs nothing; what it saved is counted apart


def test_kill_scenario_smoke(tmp_path: Path) -> None:
    result = run("kill", "fake", users=6, duration=6, max_requests=0, seed=1, out=tmp_path)
    _, meta, records, report = _report(tmp_path)
    killed = [e for e in meta["events"] if "killed (SIGKILL)" in e["what"]]
    assert len(killed) == 1 and "killed (SIGKILL)" in report
    after = [r for r in records if r["t"] > killed[0]["at"] + 1.0]
    # only streams cut mid-way by the kill can fail; later requests go to the surviving deployment
    assert after and all(r["ok"] for r in after)
    assert result["errors"] <= 6 and all(r["served_model"] == "big" for r in after if r.get("kind") != "embed")


def test_replicas_scenario_smoke(tmp_path: Path) -> None:
    result = run("replicas", "fake", users=6, duration=6, max_requests=0, seed=1, out=tmp_path)
    summary, meta, _, report = _report(tmp_path)
    assert result["requests"] > 10 and result["errors"] == 0
    # three replicas behind HAProxy, each served a share; the cache in the shared Redis hits across them
    assert len(meta["requests_per_replica"]) == 3 and all(n > 0 for n in meta["requests_per_replica"])
    assert summary["cache_hit_rate"] > 0
    assert "requests per gateway replica" in report
    assert (tmp_path / "haproxy.cfg").exists() and (tmp_path / "sentinel-0.conf").exists()
    # through HAProxy a stream's first token is not held back (option http-no-delay): the fake answers in 40 ms
    assert summary["ttft_p50_ms"] < 180


FLOOR_COMMANDS = {
    "aiohttp": lambda port, up: [sys.executable, "-m", "loadtests.passthrough", "--port", str(port), "--upstream", up],
    "uvicorn-pyreqwest": lambda port, up: [str(BIN / "uvicorn"), "loadtests.passthrough_servers:asgi_app",
                                           "--port", str(port), "--log-level", "warning"],
    "uvicorn-pyqwest": lambda port, up: [str(BIN / "uvicorn"), "loadtests.passthrough_servers:asgi_app",
                                         "--port", str(port), "--log-level", "warning"],
    "granian-rsgi-aiohttp": lambda port, up: [str(BIN / "granian"), "--interface", "rsgi", "--port", str(port),
                                              "--workers", "1", "loadtests.passthrough_servers:rsgi_app"],
    "granian-asgi-pyreqwest": lambda port, up: [str(BIN / "granian"), "--interface", "asgi", "--port", str(port),
                                                "--workers", "1", "loadtests.passthrough_servers:asgi_app"],
}


@pytest.mark.parametrize("floor", list(FLOOR_COMMANDS))
def test_bare_passthrough_relays_json_and_streams(upstream: FakeUpstream, floor: str) -> None:
    """The benchmark's floors must do the same work as the gateway: whole answers and every stream chunk."""
    import subprocess

    import httpx

    from tests.conftest import ROOT, free_port, stop, wait_http

    port = free_port()
    client = floor.rsplit("-", 1)[-1] if floor.endswith(("pyreqwest", "pyqwest")) else "aiohttp"
    proc = subprocess.Popen(FLOOR_COMMANDS[floor](port, upstream.url), cwd=ROOT,
                            env={**os.environ, "PT_UPSTREAM": upstream.url, "PT_CLIENT": client})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                          json={**body, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert s.headers["content-type"].startswith("text/event-stream")
        assert lines[-1] == "data: [DONE]" and len(lines) >= 6
    finally:
        stop(proc)


def test_upstream_client_lets_go_of_vllm_when_cancelled() -> None:
    """The gateway's upstream client (aiohttp) must close the connection of a call it cancels (a client that
    left, a deadline): that close is what makes vLLM abort. Also a total timeout on a made connection must not
    look like a connect failure (that would resend the request elsewhere). pyreqwest, measured faster in
    docs/benchmarks.md, fails the first check, which is why the gateway does not use it."""
    import asyncio

    from loadtests.check_client_cancel import main

    rows = asyncio.run(main(quiet=True))
    aio = next(r for r in rows if r["client"] == "aiohttp")
    assert aio["cancel_closes_connection"] and aio["closed_after_ms"] < 500
    assert aio["timeout_error"] == "TimeoutError"


def test_prefix_ceiling_model_evicts_a_prefix_tail_first_as_vllm_does() -> None:
    from loadtests.sim_prefix_ceiling import BlockCache

    cache = BlockCache(capacity_blocks=6, block=4)
    a = list(range(100, 116))  # 4 whole blocks
    assert cache.serve(a + [1]) == 0
    assert cache.serve(a + [2]) == 16  # the whole prefix is reused
    # a 3-block stranger needs room for one more block: a's last block goes, its first three still hit
    # (evicted head first, a would find nothing: the lookup stops at the first missing block)
    cache.serve(list(range(500, 512)))
    assert cache.serve(a + [3]) == 12
    assert cache.serve([7, 7, 7, 7]) == 0  # vLLM recomputes at least the last token: a one-block prompt reuses nothing


def test_prefix_ceiling_partition_beats_random_only_when_the_cache_is_short() -> None:
    from loadtests.sim_prefix_ceiling import Workload, hit_rate

    w = Workload()
    # every application fits each engine: both reuse all but their first prefills (random pays two per app)
    big = [hit_rate(p, w, 400, 128, seed=1) for p in ("random", "partition")]
    assert big[1] > big[0] > 0.75 and big[1] / big[0] < 1.15
    # half the applications fit one engine: placement decides, and random placement loses about half
    small = [hit_rate(p, w, 34, 128, seed=1) for p in ("random", "partition")]
    assert 1.5 < small[1] / small[0] < 3.0

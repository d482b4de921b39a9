"""Smoke run of one load-test scenario against the test upstream: report, CSV and custom stats are written."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

# locust is run in its own process (importing it here would monkey-patch pytest's process with gevent)
if importlib.util.find_spec("locust") is None or importlib.util.find_spec("matplotlib") is None:
    pytest.skip("needs the load extras: pip install -e '.[load]'", allow_module_level=True)

from loadtests import prompts  # noqa: E402
from loadtests.run import run  # noqa: E402
from tests.conftest import FakeUpstream  # noqa: E402


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


def test_bare_passthrough_relays_json_and_streams(upstream: FakeUpstream) -> None:
    """The benchmark's floor must do the same work as the gateway: whole answers and every stream chunk."""
    import subprocess
    import sys

    import httpx

    from tests.conftest import ROOT, free_port, stop, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.passthrough", "--port", str(port),
                             "--upstream", upstream.url], cwd=ROOT)
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

"""Upstream faults: what the client sees is honest, and every request is accounted exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from tests.conftest import FakeUpstream, GatewayProcess, metric_value, simple_config

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@pytest.fixture
def gw(gateway_factory: Callable[..., GatewayProcess], fake: FakeUpstream) -> GatewayProcess:
    return gateway_factory(simple_config(fake.url, timeouts={"connect": 1, "first_token": 0.5, "total": 10}))


def requests_total(gw: GatewayProcess) -> float:
    return metric_value(gw.metrics(), "gateway_requests_total")


def post(gw: GatewayProcess, rid: str, **body: object) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", content=orjson.dumps({**CHAT, **body}), timeout=20,
                      headers={"Content-Type": "application/json", "X-Request-Id": rid})


def accounted_once(gw: GatewayProcess, rid: str) -> dict[str, object]:
    rec = gw.record(rid)
    time.sleep(0.1)
    assert [r["request_id"] for r in gw.records()].count(rid) == 1
    return rec


def test_stall_mid_stream_is_cut_off_with_an_error_event(gw: GatewayProcess, fake: FakeUpstream) -> None:
    fake.control(stall_after_chunks=2)
    before = requests_total(gw)
    t0 = time.monotonic()
    r = post(gw, "stall", stream=True)
    assert time.monotonic() - t0 < 3, "a stalled stream must not hang the client"
    events = [e for e in r.text.split("\n\n") if e.startswith("data:")]
    assert orjson.loads(events[-2][5:])["error"]["code"] == "upstream_stream_broken"
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' not in r.text
    rec = accounted_once(gw, "stall")
    assert rec["outcome"] == "upstream_failed_midstream" and rec["completion_tokens"] == 2
    assert requests_total(gw) - before == 1


def test_absurd_usage_is_not_believed(gw: GatewayProcess, fake: FakeUpstream) -> None:
    fake.control(absurd_usage=True)
    before = requests_total(gw)
    r = post(gw, "absurd")
    assert r.status_code == 200  # the answer itself is relayed
    assert "x-gateway-completion-tokens" not in r.headers
    rec = accounted_once(gw, "absurd")
    assert rec["usage_invalid"] is True and rec["usage_reported"] is False
    # what vLLM surely did is still billed (never free): the prompt, counted as the engine renders it;
    # the output vLLM claimed is not believed (0)
    assert rec["completion_tokens"] == 0 and 0 < rec["prompt_tokens"] < 100 and 0 < rec["cost_usd"] < 1e-3
    assert requests_total(gw) - before == 1
    assert metric_value(gw.metrics(), "gateway_completion_tokens_total") < 10**9


def test_upstream_restart(gw: GatewayProcess, fake: FakeUpstream) -> None:
    """The upstream goes away and comes back on the same port: errors while it is down, then service."""
    assert post(gw, "before-restart").status_code == 200
    port = fake.url.rsplit(":", 1)[1]
    fake.kill()
    down = post(gw, "while-down")
    assert down.status_code == 502 and down.json()["error"]["code"] == "upstream_unavailable"
    import subprocess
    import sys

    from tests.conftest import ROOT, wait_http
    fake.proc = subprocess.Popen([sys.executable, "-m", "gateway.testing.fake_vllm", "--port", port,
                                  "--model", "m1"], cwd=ROOT)
    wait_http(f"{fake.url}/health", proc=fake.proc)
    deadline = time.monotonic() + 10
    while post(gw, "after-restart").status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not recover after the upstream restarted"
        time.sleep(0.2)
    for rid in ("before-restart", "while-down"):
        accounted_once(gw, rid)

"""The dashboard queries on vLLM-only metrics (its TTFT/ITL/e2e/queue histograms, preemptions, prefix cache),
which the fake upstream does not export, against REAL vLLM (CPU build, deploy/local/engines.py) behind the
gateway, scraped by a real Prometheus. An engine already running is reused when VLLM_CHAT_URL names it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import start_gateway, stop
from tests.test_dashboards import VLLM_ONLY, Target, all_targets, dashboards, hostport, start_prometheus, substitute

pytestmark = pytest.mark.vllm
VLLM_TARGETS = [t for t in all_targets() if VLLM_ONLY.search(t.expr)]


@pytest.fixture(scope="module")
def results(vllm: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list]]:
    tmp = tmp_path_factory.mktemp("dash-vllm")
    chat_url = vllm["chat"]  # the session's shared engine (tests/vllm_fixtures.py)
    gw = start_gateway(tmp, {"models": {
        "smollm2": {"tier": "small", "prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2},
                    "deployments": [{"name": "smollm2-a", "url": chat_url, "model": "smollm2"}]}}})
    prom = start_prometheus(tmp, [
        {"job_name": "gateway", "static_configs": [{"targets": [hostport(gw.url)]}]},
        {"job_name": "vllm", "static_configs": [{"targets": [hostport(chat_url)],
                                                 "labels": {"deployment": "smollm2-a"}}]}])
    try:
        start = time.time()
        time.sleep(2)
        shared = "You are a terse assistant. Answer in a few words. " * 8  # a long shared prefix: prefix-cache hits
        for i in range(6):
            httpx.post(gw.url + "/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "max_tokens": 8, "stream": i % 2 == 0,
                "messages": [{"role": "system", "content": shared}, {"role": "user", "content": f"Count to {i}"}]})
        ds = dashboards()
        out: dict[str, list] = {}
        deadline = time.monotonic() + 30
        while True:
            end = time.time()
            out = {t.id: prom.query_range(substitute(t.expr, ds[t.dashboard], int(end - start) + 5), start, end)
                   for t in VLLM_TARGETS}
            if all(out.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
        yield out
    finally:
        stop(prom.proc)
        stop(gw.proc)


@pytest.mark.parametrize("target", VLLM_TARGETS, ids=lambda t: t.id)
def test_vllm_panel_query_returns_data(results: dict[str, list], target: Target) -> None:
    assert results[target.id], f"no data from real vLLM for {target.id}:\n{target.expr}"

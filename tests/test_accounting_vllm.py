"""Accounting in every ending against REAL vLLM: the gateway's totals equal vLLM's own counters.

A mixed workload (n=1 and n=3, streamed and not; a list of 3 prompts streamed; clients that leave before
the first token, mid-stream and as slow readers; a first-token timeout that falls back; embeddings) runs
through one gateway. Afterwards served + fan-out + wasted tokens equal the rise of vLLM's
`vllm:prompt_tokens_total` / `vllm:generation_tokens_total`, up to the tokens vLLM produced after a
leaving client's connection closed (it counts them, nobody received them): that gap is measured, bounded
and written to docs/accounting.md. Ledger, metrics and log lines agree to the last pico-USD.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from gateway.record import OUTCOMES
from tests.conftest import GatewayProcess, metric_value, start_gateway, stop
from tests.vllm_fixtures import stack_config, vllm_counter

pytestmark = pytest.mark.vllm

LONG = " ".join(f"Item {i} is a small fact about gateways and their accounting." for i in range(120))


@pytest.fixture(scope="module")
def gw(vllm: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    cfg = stack_config(vllm["chat"], vllm["embed"])
    # Two deployments on the same engine: the first gives up on its first token almost at once.
    cfg["models"]["smollm2-ft"] = {
        "prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2},
        "deployments": [
            {"name": "impatient", "url": vllm["chat"], "model": "smollm2",
             "timeouts": {"connect": 2, "first_token": 0.05, "total": 120}},
            {"name": "patient", "url": vllm["chat"], "model": "smollm2",
             "timeouts": {"connect": 2, "first_token": 60, "total": 120}}]}
    g = start_gateway(tmp_path_factory.mktemp("gw-acct"), cfg)
    yield g
    stop(g.proc)


def chat(content: str, **kw: Any) -> dict[str, Any]:
    # ignore_eos (a vLLM sampling parameter): the tiny model must not stop early, or a client meant to leave
    # mid-stream would find the stream already complete
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}], "temperature": 0.8,
            "ignore_eos": True, **kw}


def post(g: GatewayProcess, body: dict[str, Any], rid: str, path: str = "/v1/chat/completions") -> None:
    r = httpx.post(g.url + path, json=body, timeout=120, headers={"X-Request-Id": rid})
    assert r.status_code == 200, r.text


def stream(g: GatewayProcess, body: dict[str, Any], rid: str, path: str = "/v1/chat/completions",
           leave_after: int | None = None, read_timeout: float = 120) -> None:
    timeout = httpx.Timeout(120, read=read_timeout)
    try:
        with httpx.stream("POST", g.url + path, json={**body, "stream": True}, timeout=timeout,
                          headers={"X-Request-Id": rid}) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if leave_after is not None and seen >= leave_after:
                        return  # the client leaves mid-stream
    except httpx.ReadTimeout:
        return  # the client gave up before its first token


def slow_reader(g: GatewayProcess, body: dict[str, Any], rid: str) -> None:
    """Reads the headers, then stops reading (a tiny receive window) and leaves two seconds later."""
    raw = orjson.dumps({**body, "stream": True})
    host, port = g.url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Request-Id: " + rid.encode() + b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    s.recv(512)
    time.sleep(2)
    s.close()


def test_gateway_totals_equal_vllms_counters_in_every_ending(gw: GatewayProcess, vllm: dict[str, str]) -> None:
    before = {e: (vllm_counter(vllm[e], "vllm:prompt_tokens_total"),
                  vllm_counter(vllm[e], "vllm:generation_tokens_total")) for e in ("chat", "embed")}
    jobs = [
        lambda: post(gw, chat("Name three colours.", max_tokens=12), "n1"),
        lambda: stream(gw, chat("Name three animals.", max_tokens=12), "n1-stream"),
        lambda: post(gw, chat("Say a word.", max_tokens=6, n=3), "n3"),
        lambda: stream(gw, chat("Say a number.", max_tokens=6, n=3), "n3-stream"),
        lambda: stream(gw, {"model": "smollm2", "prompt": ["The sky is", "Water is", "Fire is"], "max_tokens": 8},
                       "three-prompts", "/v1/completions"),
        lambda: stream(gw, chat(LONG + " Summarise.", max_tokens=40), "left-before-first-token",
                       read_timeout=0.05),
        lambda: stream(gw, chat("Count from one to one hundred.", max_tokens=200), "left-midstream", leave_after=6),
        lambda: stream(gw, chat("Count slowly to fifty.", max_tokens=150, n=3), "left-n3-midstream",
                       leave_after=9),
        lambda: slow_reader(gw, chat("Write a long list of fruits.", max_tokens=200, n=2), "slow-reader"),
        lambda: stream(gw, {**chat(LONG + " One word?", max_tokens=5), "model": "smollm2-ft"}, "fell-back"),
        lambda: post(gw, {"model": "minilm", "input": ["hello world", "gateways account"]}, "emb",
                     "/v1/embeddings"),
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: job(), jobs))
    time.sleep(2)  # let vLLM finish aborting and the gateway write its last records
    rids = ["n1", "n1-stream", "n3", "n3-stream", "three-prompts", "left-before-first-token", "left-midstream",
            "left-n3-midstream", "slow-reader", "fell-back", "emb"]
    recs = {rid: gw.record(rid, timeout=30) for rid in rids}

    for r in recs.values():
        print(f"{r['request_id']:<24} {r['outcome']:<28} prompt {r['prompt_tokens']:>5} completion "
              f"{r['completion_tokens']:>4} fan-out {r['fanout_prompt_tokens']:>4} wasted "
              f"{r['wasted_prompt_tokens']}/{r['wasted_completion_tokens']} client_wait {r['client_wait_ms']} ms")
    # Every record names its ending.
    assert all(r["outcome"] in OUTCOMES for r in recs.values())
    assert recs["left-midstream"]["outcome"] == "client_left_midstream"
    assert recs["left-n3-midstream"]["outcome"] == "client_left_midstream"
    assert recs["slow-reader"]["outcome"] in ("client_left_slow_reader", "client_left_midstream")
    assert recs["left-before-first-token"]["outcome"] in ("client_left_before_response", "client_left_midstream")
    assert recs["n3"]["fanout_prompt_tokens"] == 2 * recs["n3"]["prompt_tokens"] > 0
    fb = recs["fell-back"]
    assert fb["deployment"] == "patient" and fb["attempts"][0]["outcome"] == "first_token_timeout"

    # Tokens: served + fan-out + wasted == vLLM's own counters, up to the measured abort gap.
    chat_recs = [r for r in recs.values() if r["endpoint"] != "embeddings"]
    gw_prompt = sum(r["prompt_tokens"] + r["fanout_prompt_tokens"] + r["wasted_prompt_tokens"] for r in chat_recs)
    gw_gen = sum(r["completion_tokens"] + r["wasted_completion_tokens"] for r in chat_recs)
    d_prompt = vllm_counter(vllm["chat"], "vllm:prompt_tokens_total") - before["chat"][0]
    d_gen = vllm_counter(vllm["chat"], "vllm:generation_tokens_total") - before["chat"][1]
    left = [r for r in chat_recs if r["outcome"].startswith("client_left")]
    left_choices = sum(3 if "n3" in r["request_id"] else 2 if r["request_id"] == "slow-reader" else 1 for r in left)
    gap_prompt, gap_gen = d_prompt - gw_prompt, d_gen - gw_gen
    print(f"\nvLLM prompt {d_prompt:.0f} vs gateway {gw_prompt}; generation {d_gen:.0f} vs gateway {gw_gen}; "
          f"gap prompt {gap_prompt:.0f}, generation {gap_gen:.0f} over {len(left)} left streams "
          f"({left_choices} choices)")
    # vLLM counts a token when its engine step ends and writes it a moment later: a client that leaves in
    # between costs at most one step per running choice that nobody received (and, before the first token,
    # at most that request's prompt). Never the other way round: the gateway never bills more than vLLM did.
    assert 0 <= gap_gen <= 2 * left_choices
    long_prompt = fb["prompt_tokens"] + 16  # the two requests left before their first token carry LONG
    at_risk = (recs["left-before-first-token"]["prompt_tokens"] == 0) + (fb["attempts"][0]["usage"] != "reported")
    assert 0 <= gap_prompt <= at_risk * long_prompt
    emb = recs["emb"]
    assert emb["prompt_tokens"] == vllm_counter(vllm["embed"], "vllm:prompt_tokens_total") - before["embed"][0]

    # Money: the log lines, the metrics and the usage ledger add up to the same pico-USD.
    log_total = sum(r["cost_pico_usd"] for r in gw.records())
    metrics_total = metric_value(gw.metrics(), "gateway_cost_usd_total")
    usage = httpx.get(gw.url + "/v1/usage", timeout=10).json()["totals"]
    assert usage["cost_pico_usd"] == log_total
    assert round(metrics_total * 10**12) == pytest.approx(log_total, abs=log_total * 1e-12 + 1)
    assert sum(r["cost_pico_usd"] for r in gw.records()) == sum(
        r["prompt_tokens"] * 100_000 + r["completion_tokens"] * 200_000 for r in gw.records()
        if r["served_model"] in ("smollm2", "smollm2-ft")) + sum(
        r["prompt_tokens"] * 10_000 for r in gw.records() if r["served_model"] == "minilm")


def test_openai_sdk_stream_with_n3_reports_usage_once(gw: GatewayProcess) -> None:
    c = OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = list(c.chat.completions.create(model="smollm2", max_tokens=5, n=3, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Hi"}]))
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens <= 15
    assert {ch.choices[0].index for ch in chunks if ch.choices} == {0, 1, 2}

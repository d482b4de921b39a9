"""Catalogue LoRA adapters loaded on demand, against a REAL vLLM CPU engine (issue 25's acceptance).

The engine is private to this module: SmolLM2 with LoRA enabled but no adapter at start,
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --max-loras 2; the gateway may hold 2 adapters on it
(`adapter_slots: 2`). Adapters: the trained `sentiment` one and untrained ones made with PEFT
(deploy/local/make_adapters.py). One test restarts the engine under the running gateway.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProcess, free_port, metric_value, start_gateway, stop
from tests.vllm_fixtures import chat_tokenizer, engines

pytestmark = pytest.mark.vllm

RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
ROOT = Path(__file__).resolve().parent.parent


def _start_engine(port: int) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = engines.start_chat_engine(port, static_loras=False, env=RUNTIME_LORA,
                                                              extra_args=["--max-loras", "2"])
    engines.wait_healthy(f"http://127.0.0.1:{port}", timeout=900, proc=proc)
    return proc


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, Any]]:
    engines.ensure_ready(verbose=False)
    port = free_port()
    box: dict[str, Any] = {"port": port, "url": f"http://127.0.0.1:{port}", "proc": _start_engine(port)}
    yield box  # the restart test replaces box["proc"]
    engines.stop(box["proc"])


@pytest.fixture(scope="module")
def gw(engine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    manifest = engines.manifest()
    catalogue = {"sentiment": {"base": "smollm2", "path": manifest["lora_modules"]["sentiment"],
                               "prices": {"prompt_per_1m": 0.05, "completion_per_1m": 0.1}}}
    catalogue |= {name: {"base": "smollm2", "path": path} for name, path in engines.untrained_adapters(5).items()}
    cfg = {"models": {"smollm2": {"tier": "small", "tokenizer": chat_tokenizer(),
                                  "prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2},
                                  "deployments": [{"name": "chat-a", "url": engine["url"], "model": "smollm2",
                                                   "adapter_slots": 2,
                                                   "timeouts": {"connect": 2, "first_token": 120, "total": 300}}]}},
           "adapters": catalogue,
           "adapter_placement": {"sync_interval_s": 3600, "load_timeout_s": 60, "slot_wait_s": 120},
           "server": {"health_interval": 1.0},
           "cache": {"mode": "off"}}  # every request must reach the engine (no answer, no coalescing, from cache)
    g = start_gateway(tmp_path_factory.mktemp("gw-adapters-vllm"), cfg)
    yield g
    stop(g.proc)


def engine_adapters(engine: dict[str, Any]) -> set[str]:
    data = httpx.get(f"{engine['url']}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def chat(gw: GatewayProcess, model: str, content: str = "Say hello.", max_tokens: int = 4,
         **kw: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=300, json={
        "model": model, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}], **kw})


def test_sentiment_loaded_on_demand_answers_the_held_out_set(gw: GatewayProcess, engine: dict[str, Any]) -> None:
    assert engine_adapters(engine) == set()  # absent at start
    prompt = engines.manifest()["sentiment_prompt"]
    rows = [json.loads(x) for x in (ROOT / "deploy/local/data/sentiment.jsonl").read_text().splitlines() if x.strip()]
    held_out = [r for r in rows if r["split"] == "heldout"]
    first = chat(gw, "sentiment", prompt.format(text=held_out[0]["text"]), 3)
    assert first.status_code == 200, first.text
    assert first.headers["x-gateway-adapter-load"] == "cold" and float(first.headers["x-gateway-adapter-load-ms"]) > 0
    assert engine_adapters(engine) == {"sentiment"}

    def answer(row: dict[str, Any]) -> bool:
        r = chat(gw, "sentiment", prompt.format(text=row["text"]), 3)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"]).strip().lower().startswith(row["label"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        correct = sum(pool.map(answer, held_out))
    accuracy = correct / len(held_out)
    print(f"sentiment adapter loaded on demand: held-out accuracy {accuracy:.3f} ({correct}/{len(held_out)})")
    documented = engines.adapter_eval()
    assert documented is not None
    assert accuracy >= documented["lora_sentiment"]["accuracy"] - 0.03  # 1.000 in fp32 transformers; bf16 vLLM


def test_two_slots_four_adapters_least_recently_used_is_unloaded(gw: GatewayProcess, engine: dict[str, Any]) -> None:
    held: list[str] = list(engine_adapters(engine))  # what the previous test left: the gateway's view too
    for name in ("untrained-00", "untrained-01", "untrained-02", "untrained-03"):
        r = chat(gw, name)
        assert r.status_code == 200, r.text
        held = [*(h for h in held if h != name), name][-2:]  # least recently used first, two slots
        assert engine_adapters(engine) == set(held)
        assert metric_value(gw.metrics(), "gateway_adapters_held", engine="chat-a") == 2
    m = gw.metrics()
    assert metric_value(m, "gateway_adapter_evictions_total", adapter="untrained-00", reason="lru") == 1
    assert metric_value(m, "gateway_adapter_loads_total", adapter="untrained-03", reason="cold") == 1


def test_request_in_flight_is_not_broken_by_eviction_pressure(gw: GatewayProcess, engine: dict[str, Any]) -> None:
    assert chat(gw, "untrained-00").status_code == 200
    assert chat(gw, "untrained-01").status_code == 200  # untrained-00 is now the least recently used
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(lambda: httpx.post(f"{gw.url}/v1/chat/completions", timeout=300, json={
            "model": "untrained-00", "stream": True, "max_tokens": 120, "temperature": 0,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]}))
        # while it streams, two other adapters need a slot each: the busy one must stay
        for name in ("untrained-02", "untrained-03"):
            r = chat(gw, name)
            assert r.status_code == 200, r.text
            assert "untrained-00" in engine_adapters(engine) or long.done()
        stream = long.result()
    assert stream.status_code == 200
    chunks = [json.loads(line[6:]) for line in stream.text.splitlines()
              if line.startswith("data: {")]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 120  # it ran to the end


def test_ten_concurrent_first_requests_for_a_cold_adapter_cause_one_load(gw: GatewayProcess,
                                                                         engine: dict[str, Any]) -> None:
    assert "untrained-04" not in engine_adapters(engine)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: chat(gw, "untrained-04"), range(10)))
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers if a.status_code != 200]
    assert metric_value(gw.metrics(), "gateway_adapter_loads_total", adapter="untrained-04") == 1
    assert sum(a.headers.get("x-gateway-adapter-load") == "cold" for a in answers) == 1


def test_engine_restarted_under_the_gateway_reloads_the_adapter(gw: GatewayProcess, engine: dict[str, Any]) -> None:
    assert chat(gw, "untrained-04").status_code == 200  # held by the engine and, as the gateway believes, there
    engines.stop(engine["proc"])
    engine["proc"] = _start_engine(engine["port"])
    assert engine_adapters(engine) == set()
    r = chat(gw, "untrained-04")  # the gateway may or may not have seen the engine down: never a 404
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-adapter-load"] == "reload"
    assert engine_adapters(engine) == {"untrained-04"}

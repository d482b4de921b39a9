"""The gateway in front of REAL vLLM (CPU build, SmolLM2-135M-Instruct + a LoRA adapter, MiniLM embeddings).

A session-wide fixture prepares the engine (deploy/local/engines.py: venv + models, cached) and starts
the engines once; engines already running are reused when VLLM_CHAT_URL / VLLM_EMBED_URL name them.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.conftest import GatewayProcess, free_port, metric_value, start_gateway, stop
from tests.vllm_fixtures import engines, stack_config, vllm_counter

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def gw(vllm: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = start_gateway(tmp_path_factory.mktemp("gw-vllm"), stack_config(vllm["chat"], vllm["embed"]))
    yield g
    stop(g.proc)


def client(g: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_and_completion_stream_and_not(gw: GatewayProcess) -> None:
    c = client(gw)
    r = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=12,
                                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model="smollm2", temperature=0, max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "Say hello."}]))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
    assert all(ch.usage is None for ch in chunks)
    comp = c.completions.create(model="smollm2", prompt="The sky is", max_tokens=5, temperature=0)
    assert comp.usage is not None and comp.usage.completion_tokens == 5
    texts = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt="One, two,",
                                                                max_tokens=4, stream=True) if ch.choices]
    assert "".join(texts)


def test_adapter_selected_by_name_and_by_task(gw: GatewayProcess) -> None:
    c = client(gw)
    prompt = ("Classify the sentiment of this review as positive or negative. Answer with one word: "
              "positive or negative.\n\nReview: Absolutely wonderful, I loved every minute of it.")
    raw = c.chat.completions.with_raw_response.create(model="sentiment", temperature=0, max_tokens=3,
                                                      messages=[{"role": "user", "content": prompt}])
    assert raw.headers["x-gateway-upstream-model"] == "sentiment"
    assert "positive" in (raw.parse().choices[0].message.content or "").lower()
    routed = c.chat.completions.with_raw_response.create(
        model="assistant", temperature=0, max_tokens=3, messages=[{"role": "user", "content": prompt}],
        extra_headers={"x-gateway-task": "classification"})
    assert routed.headers["x-gateway-model"] == "sentiment" and routed.headers["x-gateway-rule"] == "task"
    ids = {m.id for m in c.models.list()}
    assert {"smollm2", "sentiment", "minilm", "assistant"} <= ids


def test_embeddings(gw: GatewayProcess) -> None:
    raw = client(gw).embeddings.with_raw_response.create(model="minilm", input=["hello world", "gateways"])
    emb = raw.parse()
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    assert int(raw.headers["x-gateway-prompt-tokens"]) == emb.usage.prompt_tokens > 0


def test_token_counters_match_vllms_own_exactly(gw: GatewayProcess, vllm: dict[str, str]) -> None:
    """Over a batch of mixed requests, the gateway's counters rise by exactly what vLLM's rose."""
    c = client(gw)
    before_gw = gw.metrics()
    before_p = vllm_counter(vllm["chat"], "vllm:prompt_tokens_total")
    before_g = vllm_counter(vllm["chat"], "vllm:generation_tokens_total")

    def one(i: int) -> None:
        msg = [{"role": "user", "content": f"Write a sentence about the number {i}."}]
        if i % 4 == 0:
            c.chat.completions.create(model="smollm2", messages=msg, max_tokens=6 + i)
        elif i % 4 == 1:
            list(c.chat.completions.create(model="smollm2", messages=msg, max_tokens=6 + i, stream=True))
        elif i % 4 == 2:
            c.completions.create(model="smollm2", prompt=f"Number {i} is", max_tokens=4 + i)
        else:
            list(c.chat.completions.create(model="sentiment", messages=msg, max_tokens=3, stream=True))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(12)))
    time.sleep(0.5)
    after_gw = gw.metrics()
    d_vllm_p = vllm_counter(vllm["chat"], "vllm:prompt_tokens_total") - before_p
    d_vllm_g = vllm_counter(vllm["chat"], "vllm:generation_tokens_total") - before_g
    chat_models = [{"model": "smollm2"}, {"model": "sentiment"}]
    d_gw_p = sum(metric_value(after_gw, "gateway_prompt_tokens_total", **m)
                 - metric_value(before_gw, "gateway_prompt_tokens_total", **m) for m in chat_models)
    d_gw_g = sum(metric_value(after_gw, "gateway_completion_tokens_total", **m)
                 - metric_value(before_gw, "gateway_completion_tokens_total", **m) for m in chat_models)
    assert d_vllm_p > 0 and d_vllm_g > 0
    assert (d_gw_p, d_gw_g) == (d_vllm_p, d_vllm_g)


def test_fallback_when_one_real_engine_is_killed_mid_run(
        vllm: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two real engines behind one model; one is killed while requests flow; no client sees an error."""
    port = free_port()
    second = engines.start_chat_engine(port)  # same flags as the first: reuses its compile cache
    second_url = f"http://127.0.0.1:{port}"
    try:
        engines.wait_healthy(second_url, timeout=900, proc=second)
        extra = [{"name": "smollm2-b", "url": second_url, "model": "smollm2", "weight": 4,
                  "timeouts": {"connect": 2, "first_token": 60, "total": 120}}]
        g = start_gateway(tmp_path_factory.mktemp("gw-fallback"), stack_config(vllm["chat"], vllm["embed"], extra))
        try:
            c = client(g)
            served: list[str] = []
            errors: list[BaseException] = []
            killed = threading.Event()

            def traffic(worker: int) -> None:
                for i in range(8):
                    if worker == 0 and i == 3:
                        engines.stop(second, timeout=5)  # kill the preferred engine mid-run
                        killed.set()
                    try:
                        raw = c.chat.completions.with_raw_response.create(
                            model="smollm2", max_tokens=8, stream=False,
                            messages=[{"role": "user", "content": f"Count to {i}."}])
                        served.append(raw.headers["x-gateway-deployment"])
                    except Exception as e:  # noqa: BLE001 - collected and asserted below
                        errors.append(e)

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                list(pool.map(traffic, range(3)))
            assert killed.is_set()
            assert errors == []
            assert len(served) == 24
            assert "smollm2-b" in served and "smollm2-a" in served
            assert served[-3:] == ["smollm2-a"] * 3  # after the kill, traffic moved
            recs = [r for r in g.records() if r["status"] == 200]
            assert len(recs) == 24
        finally:
            stop(g.proc)
    finally:
        engines.stop(second)


"""The official openai SDK through the gateway: sync and async, streaming and not, with exact accounting."""

from __future__ import annotations

import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import API_KEY, FakeUpstream, GatewayProcess, metric_value


def client(gw: GatewayProcess, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def test_chat_non_streaming_headers_log_and_metrics_agree(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    before_metrics = gateway.metrics()
    before_up = upstream.counters()
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="m1", messages=[{"role": "user", "content": "one two three"}], max_tokens=7,
        extra_headers={"X-Request-Id": "req-sdk-1"})
    completion = raw.parse()
    h = raw.headers
    assert completion.usage is not None
    assert completion.choices[0].message.content == "".join(f"tok{i} " for i in range(7))
    assert h["x-request-id"] == "req-sdk-1"
    assert h["x-gateway-model"] == "m1" and h["x-gateway-deployment"] == "m1-a"
    assert int(h["x-gateway-prompt-tokens"]) == completion.usage.prompt_tokens == 2 + 4 + 3
    assert int(h["x-gateway-completion-tokens"]) == completion.usage.completion_tokens == 7
    expected_cost = (9 * 1.0 + 7 * 2.0) / 1e6
    assert float(h["x-gateway-cost-usd"]) == pytest.approx(expected_cost)
    assert float(h["x-gateway-e2e-ms"]) >= float(h["x-gateway-upstream-ms"])

    rec = gateway.record("req-sdk-1")
    assert rec["tenant"] == "team-a" and rec["status"] == 200 and rec["outcome"] == "ok"
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (9, 7)
    assert rec["cost_usd"] == pytest.approx(expected_cost)
    assert "one two three" not in orjson.dumps(rec).decode()  # no prompt text in the log
    assert API_KEY not in orjson.dumps(rec).decode()  # nor the key

    after = gateway.metrics()
    labels = {"model": "m1", "deployment": "m1-a", "tenant": "team-a"}
    assert metric_value(after, "gateway_prompt_tokens_total", **labels) - \
        metric_value(before_metrics, "gateway_prompt_tokens_total", **labels) == 9
    assert metric_value(after, "gateway_completion_tokens_total", **labels) - \
        metric_value(before_metrics, "gateway_completion_tokens_total", **labels) == 7
    assert metric_value(after, "gateway_cost_usd_total", **labels) - \
        metric_value(before_metrics, "gateway_cost_usd_total", **labels) == pytest.approx(expected_cost)
    assert metric_value(after, "gateway_requests_total", status="200", **labels) - \
        metric_value(before_metrics, "gateway_requests_total", status="200", **labels) == 1
    after_up = upstream.counters()
    assert after_up["generation_tokens"] - before_up["generation_tokens"] == 7


def test_streaming_hides_usage_chunk_unless_asked(gateway: GatewayProcess) -> None:
    chunks = list(client(gateway).chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "the usage-only chunk must be hidden"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].choices[0].finish_reason == "length"

    asked = list(client(gateway).chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert asked[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in asked[:-1]), "per-chunk usage was not asked for"


def test_stream_final_accounting_event(gateway: GatewayProcess) -> None:
    """The final figures travel as an SSE comment before [DONE]: the SDK ignores it, raw readers get it."""
    with client(gateway).chat.completions.with_streaming_response.create(
            model="m1", messages=[{"role": "user", "content": "a b c d"}], max_tokens=5, stream=True,
            extra_headers={"X-Request-Id": "req-stream-acct"}) as resp:
        assert resp.headers["x-request-id"] == "req-stream-acct"
        assert resp.headers["x-gateway-deployment"] == "m1-a"
        lines = list(resp.iter_lines())
    comments = [ln for ln in lines if ln.startswith(": x-gateway-accounting ")]
    assert len(comments) == 1
    trailer = orjson.loads(comments[0].removeprefix(": x-gateway-accounting "))
    assert lines.index(comments[0]) < lines.index("data: [DONE]")
    assert (trailer["prompt_tokens"], trailer["completion_tokens"]) == (2 + 4 + 4, 5)
    assert trailer["cost_usd"] == pytest.approx((10 * 1.0 + 5 * 2.0) / 1e6)
    assert trailer["ttft_ms"] is not None and trailer["tpot_ms"] is not None
    assert trailer == gateway.record("req-stream-acct")  # the trailer is the log line


async def test_async_client_streaming_and_not(gateway: GatewayProcess) -> None:
    aclient = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
    comp = await aclient.completions.create(model="m1", prompt="the quick brown fox", max_tokens=3)
    assert comp.choices[0].text == "tok0 tok1 tok2 " and comp.usage is not None
    assert comp.usage.prompt_tokens == 5
    stream = await aclient.completions.create(model="m1", prompt="x", max_tokens=6, stream=True)
    texts = [c.choices[0].text async for c in stream]
    assert "".join(texts) == "".join(f"tok{i} " for i in range(6))
    await aclient.close()


def test_embeddings_and_models(gateway: GatewayProcess) -> None:
    c = client(gateway)
    emb = c.embeddings.create(model="m1", input=["a b", "c d e"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens == 3 + 4
    ids = {m.id for m in c.models.list()}
    assert ids == {"m1", "m1-adapter"}


def test_adapter_model_is_routed_by_name(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="m1-adapter", messages=[{"role": "user", "content": "classify this"}], max_tokens=1)
    assert raw.headers["x-gateway-upstream-model"] == "m1-adapter"
    assert upstream.counters()["last_request"]["model"] == "m1-adapter"
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx((8 * 0.5 + 1 * 1.0) / 1e6)


def test_vllm_extra_fields_pass_through_unchanged(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    extra = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "guided_json": {"type": "object"},
             "structured_outputs": {"choice": ["positive", "negative"]}, "skip_special_tokens": False}
    client(gateway).chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=2, temperature=0.3, extra_body=extra)
    sent = upstream.counters()["last_request"]
    for k, v in extra.items():
        assert sent[k] == v
    assert sent["temperature"] == 0.3 and sent["max_tokens"] == 2
    assert sent["messages"] == [{"role": "user", "content": "x"}]

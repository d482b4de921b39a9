"""REAL vLLM's prefix cache: cached prompt tokens it reports are billed at the cached price, and prefix routing.

The shared chat engine runs with --enable-prefix-caching --enable-prompt-tokens-details (tests/vllm_fixtures.py),
so a request that repeats an earlier one's long system prompt comes back with
usage.prompt_tokens_details.cached_tokens > 0 (whole KV blocks).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.conftest import GatewayProcess, metric_value, start_gateway, stop

pytestmark = pytest.mark.vllm

PROMPT_PER_1M, CACHED_PER_1M, COMPLETION_PER_1M = 0.4, 0.1, 0.8  # pico-USD per token: 400,000 / 100,000 / 800,000


@pytest.fixture(scope="module")
def gw(vllm: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # two deployments of the one engine under balance: prefix (a real choice to make, on a real engine)
    deployments = [{"name": f"smollm2-{n}", "url": vllm["chat"], "model": "smollm2",
                    "timeouts": {"connect": 2, "first_token": 120, "total": 300}} for n in ("a", "b")]
    g = start_gateway(tmp_path_factory.mktemp("gw-prefix"), {
        "cache": {"mode": "off"},
        "models": {"smollm2": {"balance": "prefix", "deployments": deployments, "prices": {
            "prompt_per_1m": PROMPT_PER_1M, "cached_prompt_per_1m": CACHED_PER_1M,
            "completion_per_1m": COMPLETION_PER_1M}}}})
    yield g
    stop(g.proc)


def long_system_prompt() -> str:
    """~700 tokens, starting with a fresh id so that no earlier request left it in vLLM's cache."""
    rules = " ".join(f"Rule {i}: answer politely, briefly and only about the topic of item {i}." for i in range(50))
    return f"Session {uuid.uuid4().hex}. You are a careful support assistant. {rules}"


def test_cached_tokens_reported_by_vllm_are_billed_at_the_cached_price(gw: GatewayProcess) -> None:
    client = OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    system = long_system_prompt()
    answers = []
    for i, question in enumerate(("What is rule 3 about?", "And what is rule 7 about?")):
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", max_tokens=8, temperature=0, extra_headers={"X-Request-Id": f"px-bill-{i}"},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        answers.append((raw.headers, raw.parse().usage))
    (h1, u1), (h2, u2) = answers
    assert u1 is not None and u2 is not None and u1.prompt_tokens > 512
    details1, details2 = u1.prompt_tokens_details, u2.prompt_tokens_details
    assert details1 is not None and details2 is not None
    assert (details1.cached_tokens or 0) == 0, "the first request cannot find a fresh prompt cached"
    cached = details2.cached_tokens or 0
    assert cached > 0 and cached % 16 == 0, f"vLLM caches whole blocks; got {cached}"
    # both went to the deployment that holds the prefix
    assert h2["x-gateway-balance"] == "affinity" and h2["x-gateway-deployment"] == h1["x-gateway-deployment"]
    for h, u, c in ((h1, u1, 0), (h2, u2, cached)):
        assert int(h["x-gateway-cached-tokens"]) == c and int(h["x-gateway-prompt-tokens"]) == u.prompt_tokens
        pico = ((u.prompt_tokens - c) * round(PROMPT_PER_1M * 1e6) + c * round(CACHED_PER_1M * 1e6)
                + u.completion_tokens * round(COMPLETION_PER_1M * 1e6))
        assert float(h["x-gateway-cost-usd"]) == pytest.approx(pico / 1e12, rel=1e-9, abs=1e-10)
    rec = gw.record("px-bill-1")
    assert rec["cached_tokens"] == cached
    assert rec["prefix_saved_pico_usd"] == cached * round((PROMPT_PER_1M - CACHED_PER_1M) * 1e6)
    assert float(h2["x-gateway-prefix-saved-usd"]) == pytest.approx(rec["prefix_saved_pico_usd"] / 1e12)
    m = gw.metrics()
    assert metric_value(m, "gateway_cached_prompt_tokens_total", model="smollm2") >= cached
    assert metric_value(m, "gateway_balance_decisions_total", model="smollm2", decision="affinity") >= 1

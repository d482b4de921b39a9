"""The reservation's prompt is a true upper bound of what the real vLLM engine counts, on every endpoint.

Property test (hypothesis) with the model's real tokenizer and chat template (gateway/prompt_tokens.py):
texts of short tokens, digits, CJK, emoji and long whitespace, tool definitions, multi-part messages,
Responses items (tool calls and their outputs) and Anthropic blocks. "Actual" is the engine's own count:
its /tokenize for chat and completions, the usage of a real 1-token answer for Responses and Messages.
The bound is also tight: the median reserved/actual over loadtests/data/prompts.jsonl is at most 1.5.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.apis.contract import CONTRACTS
from gateway.prompt_tokens import PromptCounter, Tokenizer
from gateway.reservation import OutputBounds, prompt_bound
from tests.vllm_fixtures import chat_tokenizer

pytestmark = pytest.mark.vllm

PIECES = ["a ", "a", "7", "1234567890", "漢字", "ありがとう", "😀", "👩‍👩‍👧", "   ", "\n\n", "\t", " word", "{", "}",
          "\u200b", "é", "Ω", "<|im_start|>", "http://x.y/z?q=1", "—"]
texts = st.one_of(st.lists(st.sampled_from(PIECES), min_size=1, max_size=120).map("".join),
                  st.text(min_size=1, max_size=120))
tools = st.lists(st.fixed_dictionaries({"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True), "description": texts}),
                 max_size=2)
BOUNDS = OutputBounds(1)


@pytest.fixture(scope="module")
def counter() -> PromptCounter:
    return PromptCounter(Tokenizer(chat_tokenizer()))


def _content(draw: Any) -> Any:
    if draw(st.booleans()):
        return draw(texts)
    return [{"type": "text", "text": draw(texts)} for _ in range(draw(st.integers(1, 3)))]


@st.composite
def chat_bodies(draw: Any) -> dict[str, Any]:
    msgs = [{"role": role, "content": _content(draw)}
            for role in draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=1, max_size=4))]
    body: dict[str, Any] = {"messages": msgs}
    if ts := draw(tools):
        body["tools"] = [{"type": "function", "function": {**t, "parameters": {"type": "object"}}} for t in ts]
    return body


@st.composite
def responses_bodies(draw: Any) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": draw(texts)}]}]
    if draw(st.booleans()):
        items += [{"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": json.dumps(
                      {"q": draw(texts)})},
                  {"type": "function_call_output", "call_id": "call_1", "output": draw(texts)}]
    body: dict[str, Any] = {"input": items}
    if draw(st.booleans()):
        body["instructions"] = draw(texts)
    if ts := draw(tools):
        body["tools"] = [{"type": "function", **t, "parameters": {"type": "object"}} for t in ts]
    return body


@st.composite
def messages_bodies(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": _content(draw)}]}
    if draw(st.booleans()):
        body["system"] = draw(texts)
    if ts := draw(tools):
        body["tools"] = [{**t, "input_schema": {"type": "object"}} for t in ts]
    return body


def _tokenize(url: str, req: dict[str, Any]) -> int | None:
    r = httpx.post(f"{url}/tokenize", json={"model": "smollm2", **req}, timeout=60)
    return r.json()["count"] if r.status_code == 200 else None


def _answer_prompt(url: str, path: str, body: dict[str, Any]) -> int | None:
    r = httpx.post(url + path, json={"model": "smollm2", **body}, timeout=120)
    if r.status_code != 200:
        return None  # the engine refused this input (a template that cannot render it): nothing billed
    u = r.json()["usage"]
    return int(u["input_tokens"]) + int(u.get("cache_read_input_tokens") or 0) + int(
        u.get("cache_creation_input_tokens") or 0)


SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(body=chat_bodies())
def test_chat_bound(vllm: dict[str, str], counter: PromptCounter, body: dict[str, Any]) -> None:
    actual = _tokenize(vllm["chat"], body)
    if actual is not None:
        assert prompt_bound(body, CONTRACTS["chat"], BOUNDS, [counter]) >= actual


@SETTINGS
@given(text=texts)
def test_completions_bound(vllm: dict[str, str], counter: PromptCounter, text: str) -> None:
    actual = _tokenize(vllm["chat"], {"prompt": text})
    assert actual is not None and prompt_bound({"prompt": text}, CONTRACTS["completions"], BOUNDS, [counter]) >= actual


@SETTINGS
@given(body=responses_bodies())
def test_responses_bound(vllm: dict[str, str], counter: PromptCounter, body: dict[str, Any]) -> None:
    actual = _answer_prompt(vllm["chat"], "/v1/responses", {**body, "max_output_tokens": 1, "store": False})
    if actual is not None:
        assert prompt_bound(body, CONTRACTS["responses"], BOUNDS, [counter]) >= actual


@SETTINGS
@given(body=messages_bodies())
def test_messages_bound(vllm: dict[str, str], counter: PromptCounter, body: dict[str, Any]) -> None:
    actual = _answer_prompt(vllm["chat"], "/v1/messages", {**body, "max_tokens": 1})
    if actual is not None:
        assert prompt_bound(body, CONTRACTS["messages"], BOUNDS, [counter]) >= actual


def test_short_tokens_and_the_median_ratio(vllm: dict[str, str], counter: PromptCounter) -> None:
    # 2,000 words of "a ": chars/4 estimated 1,006 for 2,006 tokens; the tokenizer counts them
    body = {"messages": [{"role": "user", "content": "a " * 2000}]}
    actual = _tokenize(vllm["chat"], body)
    assert actual is not None and actual <= prompt_bound(body, CONTRACTS["chat"], BOUNDS, [counter]) <= actual + 16
    lines = Path(__file__).resolve().parent.parent.joinpath("loadtests/data/prompts.jsonl").read_text().splitlines()
    ratios = []
    for line in lines[::20]:
        body = {"messages": [{"role": "user", "content": json.loads(line)["text"]}]}
        actual = _tokenize(vllm["chat"], body)
        assert actual is not None
        reserved = prompt_bound(body, CONTRACTS["chat"], BOUNDS, [counter])
        assert reserved >= actual
        ratios.append(reserved / actual)
    print(f"reserved/actual over {len(ratios)} prompts: median {statistics.median(ratios):.3f}, "
          f"max {max(ratios):.3f}")
    assert statistics.median(ratios) <= 1.5

"""The real vLLM engines (CPU build), started once per test session and shared by every module that needs them.

The engine venv and models are prepared by deploy/local/engines.py (cached); engines already running are
reused when VLLM_CHAT_URL / VLLM_EMBED_URL name them. The chat engine runs with prefix caching and
prompt-token details on, so usage carries `prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deploy.local import engines
from tests.conftest import free_port, metric_value

__all__ = ["chat_tokenizer", "engines", "stack_config", "vllm", "vllm_counter"]


@pytest.fixture(scope="session")
def vllm() -> Iterator[dict[str, str]]:
    chat_url, embed_url = os.environ.get("VLLM_CHAT_URL"), os.environ.get("VLLM_EMBED_URL")
    started = []
    if not (chat_url and engines.is_healthy(chat_url)):
        engines.ensure_ready()
        port = free_port()
        proc = engines.start_chat_engine(port)
        started.append(proc)
        chat_url = f"http://127.0.0.1:{port}"
        engines.wait_healthy(chat_url, timeout=900, proc=proc)
    if not (embed_url and engines.is_healthy(embed_url)):
        port = free_port()
        proc = engines.start_embedding_engine(port)
        started.append(proc)
        embed_url = f"http://127.0.0.1:{port}"
        engines.wait_healthy(embed_url, timeout=900, proc=proc)
    yield {"chat": chat_url, "embed": embed_url}
    for p in started:
        engines.stop(p)


def chat_tokenizer() -> str:
    """The folder the chat engine serves SmolLM2 from: its tokenizer.json and chat template."""
    return str(engines.manifest()["chat_model"])


def stack_config(chat_url: str, embed_url: str, extra_chat: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    tok = chat_tokenizer()
    return {
        "models": {
            "smollm2": {"tier": "small", "prices": {"prompt_per_1m": 0.1, "completion_per_1m": 0.2}, "tokenizer": tok,
                        "deployments": [*(extra_chat or []),
                                        {"name": "smollm2-a", "url": chat_url, "model": "smollm2",
                                         "timeouts": {"connect": 2, "first_token": 60, "total": 120}}]},
            "sentiment": {"tier": "adapter", "prices": {"prompt_per_1m": 0.05, "completion_per_1m": 0.1},
                          "tokenizer": tok,
                          "deployments": [{"name": "sentiment-a", "url": chat_url, "model": "sentiment"}]},
            "minilm": {"tier": "small", "prices": {"prompt_per_1m": 0.01},
                       "deployments": [{"name": "minilm-a", "url": embed_url, "model": "minilm"}]},
        },
        "routes": {"assistant": {"candidates": ["smollm2", "sentiment"],
                                 "tasks": {"classification": "sentiment"}}},
    }


def vllm_counter(url: str, name: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics", timeout=10).text, name)



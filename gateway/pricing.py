"""Cost of one request in USD, from vLLM's token usage and the model's prices or GPU cost basis."""

from __future__ import annotations

from gateway.config import Pricing
from gateway.money import PICO


def request_cost(
    pricing: Pricing,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    upstream_seconds: float,
    concurrency: int,
) -> float:
    """Token prices: uncached prompt, cached prompt and completion tokens at their own rates.

    GPU cost basis (self-hosted): the deployment's GPUs cost gpu_usd_per_hour * gpu_count; vLLM
    batches the requests it runs at once, so a request is charged its upstream time divided by the
    number of requests this gateway had in flight on that deployment when it was sent (>= 1).
    """
    if pricing.gpu_usd_per_second is not None:
        return upstream_seconds * pricing.gpu_usd_per_second / max(1, concurrency)
    uncached = max(0, prompt_tokens - cached_tokens)
    return uncached * pricing.prompt + cached_tokens * pricing.cached_prompt + completion_tokens * pricing.completion


def prefix_cache_saving_pico(pricing: Pricing, cached_tokens: int) -> int:
    """What vLLM's prefix cache saved a request, in pico-USD: its cached prompt tokens at the uncached prompt
    price minus what they were billed (0 under a GPU cost basis: the saving is already in the shorter time)."""
    if pricing.gpu_usd_per_second is not None or cached_tokens <= 0:
        return 0
    per_token = round(pricing.prompt * PICO) - round(pricing.cached_prompt * PICO)
    return cached_tokens * max(0, per_token)

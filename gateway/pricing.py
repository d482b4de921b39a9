"""Cost of one request in exact pico-USD, from vLLM's token usage and the model's prices or GPU cost basis."""

from __future__ import annotations

from gateway.config import Pricing
from gateway.money import PICO


def token_cost(pricing: Pricing, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> int:
    """Uncached prompt, cached prompt and completion tokens, each at its own rate (integers: exact)."""
    uncached = max(0, prompt_tokens - cached_tokens)
    cached = min(cached_tokens, prompt_tokens)
    return uncached * pricing.prompt_pico + cached * pricing.cached_prompt_pico \
        + completion_tokens * pricing.completion_pico


def request_cost(pricing: Pricing, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                 gpu_seconds: float) -> int:
    """Token prices, or (GPU cost basis, self-hosted) the price of the request's share of the GPUs' busy time.

    The share (`gpu_seconds`) is measured by the deployment's busy clock (gateway/upstream.py): while k
    requests are in flight each accrues 1/k of every second, so over any window the shares of all
    requests add up to the time the deployment was busy, and their costs to price x busy time.
    """
    if pricing.gpu_usd_per_second is not None:
        return round(gpu_seconds * pricing.gpu_usd_per_second * PICO)
    return token_cost(pricing, prompt_tokens, completion_tokens, cached_tokens)


def prefix_cache_saving(pricing: Pricing, prompt_tokens: int, cached_tokens: int) -> int:
    """What vLLM's prefix cache saved a request, in pico-USD: its cached prompt tokens at the uncached prompt
    price minus what they were billed (0 under a GPU cost basis: the saving is already in the shorter time)."""
    if pricing.gpu_usd_per_second is not None:
        return 0
    cached = min(max(0, cached_tokens), prompt_tokens)
    return cached * max(0, pricing.prompt_pico - pricing.cached_prompt_pico)

"""What a request may use at most: the output bound the gateway sends to vLLM, and the tokens admit reserves.

The reservation is an upper bound only if vLLM cannot generate more than was reserved, so the bound is
written into the body that is sent: a request without an output bound gets one (the field its endpoint's
contract names: `max_tokens`, `max_output_tokens`, ...; on chat vLLM reads `max_completion_tokens or
max_tokens`, so whichever fields the client sent are all set to the same capped value). Sequences are
what the contract says (completions: `max_tokens x max(n, best_of) x number of prompts`).

The prompt is counted with the model's own tokenizer and chat template where configured, else bounded by
its UTF-8 bytes (gateway/prompt_tokens.py); a request that continues a stored conversation adds that
conversation's size as vLLM counted it (vLLM prefills all of it again). With several candidate models
(a route with fallbacks) the prompt is the largest of their counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway import errors
from gateway.apis.contract import EndpointContract, contract_of
from gateway.prompt_tokens import BYTE_BOUND, MAX_TOKENS_SANE, PromptCounter

BYTES_PER_TOKEN_TYPICAL = 4  # English prose on a BPE vocabulary; only for the context-window clamp


@dataclass(frozen=True, slots=True)
class OutputBounds:
    """Resolved once per model: what a request gets without max_tokens, and the most it may ask for."""

    default_max_tokens: int
    max_output_tokens: int | None = None  # None: no cap beyond the context window (vLLM enforces that)
    context_window: int | None = None
    media_part_tokens: int = 4096


def _json_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    """A JSON integer field (absent/null -> None). Floats, strings and booleans are refused, never defaulted."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise errors.bad_request(f"'{name}' must be an integer.", param=name)
    if v < minimum:
        raise errors.bad_request(f"'{name}' must be at least {minimum}.", param=name)
    return v


def _contract(endpoint: str | EndpointContract) -> EndpointContract:
    return contract_of(endpoint) if isinstance(endpoint, str) else endpoint


def bound_output(body: dict[str, Any], endpoint: str | EndpointContract, b: OutputBounds,
                 prompt_estimate: int | None = None) -> int:
    """Cap or set the body's output bound (mutates `body`); return max tokens per generated sequence (0: none)."""
    fields = _contract(endpoint).output_fields
    if not fields:
        return 0
    asked = [(f, v) for f in fields if (v := _json_int(body, f, 1)) is not None]
    cap = b.max_output_tokens
    if asked:
        bound = asked[0][1]  # vLLM's precedence; every field sent is then set to the same value anyway
        if cap is not None:
            bound = min(bound, cap)
        bound = min(bound, MAX_TOKENS_SANE)
        for f, v in asked:
            if v != bound:
                body[f] = bound
        return bound
    bound = b.default_max_tokens if cap is None else min(b.default_max_tokens, cap)
    if b.context_window is not None and prompt_estimate is not None:
        # the estimate is above the real prompt, so this never asks vLLM for more than the window holds
        bound = max(1, min(bound, b.context_window - prompt_estimate))
    body[fields[-1]] = bound
    return bound


def prompt_bound(body: dict[str, Any], endpoint: str | EndpointContract, b: OutputBounds,
                 counters: Sequence[PromptCounter] = (BYTE_BOUND,), stored_context: int = 0) -> int:
    """An upper bound on the prompt tokens vLLM will count for this request, on any of the candidates."""
    contract = _contract(endpoint)
    if not contract.billed:
        return 0
    conv = contract.conversation(body)
    n = max(c.bound(conv, b.media_part_tokens) for c in counters) if counters else 0
    return min(n + stored_context, MAX_TOKENS_SANE)


def reserve(body: dict[str, Any], endpoint: str | EndpointContract, b: OutputBounds,
            counters: Sequence[PromptCounter] = (BYTE_BOUND,), stored_context: int = 0) -> tuple[int, int]:
    """(prompt bound, completion reservation); sets or caps the body's output bound on the way."""
    contract = _contract(endpoint)
    prompt = prompt_bound(body, contract, b, counters, stored_context)
    # The default bound is kept inside a known context window (vLLM refuses prompt + max_tokens beyond it).
    # A byte bound is ~4x a real count: clamping by it would cut answers, so the clamp takes a typical size.
    counted = all(c.tokenizer is not None for c in counters)
    per_sequence = bound_output(body, contract, b, prompt if counted else prompt // BYTES_PER_TOKEN_TYPICAL)
    if per_sequence == 0:
        return prompt, 0
    return prompt, min(per_sequence * contract.sequences(body), MAX_TOKENS_SANE)

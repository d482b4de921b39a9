"""What a request may use at most: the output bound the gateway sends to vLLM, and the token estimate admit reserves.

The reservation is an upper bound only if vLLM cannot generate more than was reserved, so the bound is
written into the body that is sent: a request without `max_tokens` / `max_completion_tokens` gets
`max_tokens` set (vLLM honours it on both endpoints; on chat it reads `max_completion_tokens or
max_tokens`, so whichever fields the client sent are all set to the same capped value). Completions are
reserved per sequence: `max_tokens x max(n, best_of) x number of prompts`. The prompt estimate counts
text (ASCII characters / `chars_per_token`, plus every UTF-8 byte beyond the first of a non-ASCII
character), the serialized size of tools, functions, response_format and every non-text field of a
message, and a fixed `media_part_tokens` per image/audio/video part (their base64 payload is not text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway import errors

OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")  # vLLM chat: max_completion_tokens wins when both set
# The field that bounds the output, per API (Responses: max_output_tokens; Anthropic Messages: max_tokens).
OUTPUT_FIELDS_BY_ENDPOINT = {"responses": ("max_output_tokens",), "messages": ("max_tokens",)}
NO_OUTPUT = frozenset({"embeddings", "tokenize", "detokenize"})
# Request fields the chat template or the guided decoder turns into prompt tokens, besides messages/prompt.
PROMPT_JSON_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format", "guided_json",
                      "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "suffix",
                      "chat_template", "chat_template_kwargs", "documents", "system", "instructions")
MEDIA_TYPES = frozenset({"image_url", "input_image", "image", "image_pil", "image_embeds", "input_audio",
                         "audio_url", "audio", "video_url", "video", "file", "input_file"})
TEXT_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})
MAX_TOKENS_SANE = 1 << 40  # above any real limit; keeps every figure sent to Redis a valid 64-bit integer


@dataclass(frozen=True, slots=True)
class OutputBounds:
    """Resolved once per model: what a request gets without max_tokens, and the most it may ask for."""

    default_max_tokens: int
    max_output_tokens: int | None = None  # None: no cap beyond the context window (vLLM enforces that)
    context_window: int | None = None
    chars_per_token: float = 4.0
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


def bound_output(body: dict[str, Any], endpoint: str, b: OutputBounds, prompt_estimate: int | None = None) -> int:
    """Cap or set the body's output bound (mutates `body`); return max tokens per generated sequence (0: none)."""
    if endpoint in NO_OUTPUT:
        return 0
    fields = OUTPUT_FIELDS_BY_ENDPOINT.get(endpoint, OUTPUT_FIELDS)
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


def sequences(body: dict[str, Any], endpoint: str) -> int:
    """How many sequences vLLM generates: n (or best_of, if larger) per prompt, for each prompt of a list."""
    n = _json_int(body, "n", 1) or 1
    best_of = _json_int(body, "best_of", 1) or 1
    per_prompt = max(n, best_of)
    if endpoint != "completions":
        return per_prompt
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return per_prompt * len(prompt)  # a list of strings or of token lists: one completion set each
    return per_prompt


def text_tokens(s: str, chars_per_token: float) -> int:
    n = len(s)
    extra = len(s.encode("utf-8", "surrogatepass")) - n if not s.isascii() else 0
    return math.ceil(n / chars_per_token) + extra


def json_chars(value: Any) -> int:
    """Characters of `value` as JSON, roughly (walked iteratively: no recursion limit, no encoder depth limit)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, dict):
            total += 2 + len(v)
            for k, x in v.items():
                total += len(str(k)) + 3
                stack.append(x)
        elif isinstance(v, list | tuple):
            total += 2 + len(v)
            stack.extend(v)
        else:
            total += len(str(v))
    return total


def _content_tokens(content: Any, b: OutputBounds) -> int:
    if isinstance(content, str):
        return text_tokens(content, b.chars_per_token)
    if not isinstance(content, list):
        return 0 if content is None else math.ceil(json_chars(content) / b.chars_per_token)
    n = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None  # {"type": [..]} must not raise here
        text = part.get("text", part.get(kind)) if kind in TEXT_TYPES else None
        if isinstance(text, str):
            n += text_tokens(text, b.chars_per_token)
        elif kind in MEDIA_TYPES or (isinstance(part, dict) and MEDIA_TYPES.intersection(part)):
            n += b.media_part_tokens
        else:
            n += math.ceil(json_chars(part) / b.chars_per_token)
    return n


def estimate_prompt_tokens(body: dict[str, Any], endpoint: str, b: OutputBounds) -> int:
    """An over-estimate of the prompt's tokens without a tokenizer (see the module docstring)."""
    n = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        n += 2
        for m in messages:
            n += 4  # role markers of the chat template
            if isinstance(m, dict):
                n += _content_tokens(m.get("content"), b)
                rest = {k: v for k, v in m.items() if k not in ("content", "role")}
                if rest:
                    n += math.ceil(json_chars(rest) / b.chars_per_token)
            else:
                n += math.ceil(json_chars(m) / b.chars_per_token)
    prompt = body.get("prompt", body.get("input")) if endpoint != "chat" else None
    if isinstance(prompt, str):
        n += 1 + text_tokens(prompt, b.chars_per_token)
    elif isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, int):
                n += 1
            elif isinstance(p, list):
                n += len(p)
            elif isinstance(p, str):
                n += 1 + text_tokens(p, b.chars_per_token)
            else:
                n += 1 + math.ceil(json_chars(p) / b.chars_per_token)
    elif prompt is not None:
        n += math.ceil(json_chars(prompt) / b.chars_per_token)
    for f in PROMPT_JSON_FIELDS:
        v = body.get(f)
        if v is not None:
            n += math.ceil(json_chars(v) / b.chars_per_token)
    return min(n, MAX_TOKENS_SANE)


def reserve(body: dict[str, Any], endpoint: str, b: OutputBounds) -> tuple[int, int]:
    """(prompt estimate, completion reservation); sets or caps the body's output bound on the way."""
    prompt = estimate_prompt_tokens(body, endpoint, b)
    per_sequence = bound_output(body, endpoint, b, prompt)
    if per_sequence == 0:
        return prompt, 0
    return prompt, min(per_sequence * sequences(body, endpoint), MAX_TOKENS_SANE)

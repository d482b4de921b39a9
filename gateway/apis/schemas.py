"""Request schemas of the Responses, Messages and tokenize APIs: the fields the gateway relies on, strictly typed.

Like gateway/protocol.py, every other field is allowed and forwarded untouched. Fields that move money or
a limit (max_output_tokens, max_tokens) must be real JSON integers and `stream` a real JSON boolean: a
string "100" or a float 1e9 is refused with a 400 naming the field, never coerced.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: StrictStr = Field(min_length=1)


class _Sampling(_Open):
    stream: StrictBool = False
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int | float)):
            raise ValueError("must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class ResponsesRequest(_Sampling):
    """POST /v1/responses (OpenAI Responses API as vLLM serves it)."""

    input: StrictStr | list[Any]
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    store: StrictBool | None = None
    background: StrictBool | None = None
    previous_response_id: StrictStr | None = Field(None, min_length=1, max_length=256)
    instructions: StrictStr | None = None

    @field_validator("background")
    @classmethod
    def _no_background(cls, v: bool | None) -> bool | None:
        if v:
            # The answer would arrive after the HTTP request ended: its usage could not be accounted.
            raise ValueError("background responses are not supported by this gateway (their usage cannot "
                             "be accounted); send the request without background")
        return v


class MessagesRequest(_Sampling):
    """POST /v1/messages (Anthropic Messages API as vLLM serves it)."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)
    system: StrictStr | list[dict[str, Any]] | None = None


class TokenizeRequest(_Open):
    """POST /tokenize: a prompt or chat messages, counted by the model's tokenizer."""

    prompt: StrictStr | None = None  # exactly one of the two, and not null
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)

    @field_validator("prompt", "messages", mode="before")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("must not be null")
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_input(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("prompt" in data) == ("messages" in data):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return data


class DetokenizeRequest(_Open):
    """POST /detokenize: token ids back to text."""

    tokens: list[StrictInt] = Field(max_length=1_000_000)

"""OpenAI wire format: request schemas the gateway validates, and the field names it reads or sets.

Requests are validated for the fields the gateway relies on; every other field (vLLM's extra sampling
and guided-decoding parameters included) is allowed and forwarded untouched.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from gateway.errors import GatewayError, bad_request

Endpoint = Literal["chat", "completions", "embeddings", "responses", "messages", "tokenize", "detokenize",
                   "responses.retrieve", "responses.cancel"]
# Each endpoint's path, schema and money rules: gateway/apis/contract.py.


# Longer names are refused before they reach a log, a metric or Redis (vLLM's own names are far shorter).
MAX_MODEL_NAME = 256


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class _Request(_Open):
    """Every proxied request names its model."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)


class StreamOptions(_Open):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class _Generation(_Request):
    # Fields that change what is generated, reserved and billed are strict JSON types: "false" is not
    # false and 400.0 is not 400 (OpenAI refuses them too).
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=128)
    seed: StrictInt | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


Prompt = str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | Annotated[
    list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]


class CompletionRequest(_Generation):
    prompt: Prompt


class EmbeddingRequest(_Request):
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None


def validate_with(schema: type[BaseModel], body: Any) -> Any:
    """Validate a parsed JSON body against an endpoint's schema (its contract names it); raise a 400 naming
    the first offending field."""
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "field required" if first["type"] == "missing" else first["msg"]
        raise bad_request(f"Invalid request: '{loc}': {msg}", param=loc or None) from None


def upstream_error(status: int, payload: Any, deployment: str) -> GatewayError:
    """Turn a vLLM error response into ours, keeping its message (vLLM already speaks OpenAI's shape)."""
    message = f"upstream {deployment} returned HTTP {status}"
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(payload.get("message"), str):
            message = payload["message"]
    if 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
        # The request itself was rejected by vLLM (e.g. prompt too long): the client's problem.
        return GatewayError(status, message, type="invalid_request_error", code="upstream_rejected")
    return GatewayError(502, message, type="api_error", code="upstream_error")

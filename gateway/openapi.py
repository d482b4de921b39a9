"""The OpenAPI description of the gateway's endpoints (request schemas and error shapes from their contracts)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.apis.contract import CONTRACTS


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Each proxied endpoint's request schema and error shape, from its contract (gateway/apis/contract.py).
REQUEST_BODIES: dict[str, type[BaseModel]] = {c.path: c.schema for c in CONTRACTS.values() if not c.stored_lookup}
ERROR_SCHEMAS: dict[str, type[BaseModel]] = {c.path: c.error_schema for c in CONTRACTS.values()
                                             if c.error_schema is not None}
ERROR_STATUSES = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model",
                  "408": "request body too slow",
                  "413": "body too large", "429": "rate limit or budget", "502": "upstream failed",
                  "503": "overloaded or no deployment", "504": "upstream timeout"}


def install_openapi(app: FastAPI, public_models: list[str]) -> None:
    """The proxy routes read their body as raw JSON (no framework parsing); describe it here instead."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible gateway for vLLM with latency and cost accounting")
        models: list[type[BaseModel]] = [*REQUEST_BODIES.values(), ErrorResponse, *ERROR_SCHEMAS.values()]
        refs, defs = models_json_schema([(m, "validation") for m in models],
                                        ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for model in REQUEST_BODIES.values():  # the names this gateway serves (models and routes)
            components[model.__name__]["properties"]["model"] = {"type": "string", "enum": public_models}
        for path, model in REQUEST_BODIES.items():
            error_ref = refs[(ERROR_SCHEMAS.get(path, ErrorResponse), "validation")]
            op = schema["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(model, "validation")]}}}
            op["responses"] = {
                "200": {"description": "the vLLM response (JSON, or text/event-stream when stream is true)",
                        "content": {"application/json": {"schema": {"type": "object"}},
                                    "text/event-stream": {"schema": {
                            "type": "object", "description": "SSE events: `data: <chunk JSON>`, "
                            "`: x-gateway-accounting <record JSON>`, `data: [DONE]`"}}}},
                **{code: {"description": why, "content": {"application/json": {"schema": error_ref}}}
                   for code, why in ERROR_STATUSES.items()},
            }
            op.pop("parameters", None)
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]

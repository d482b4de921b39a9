"""One error type for everything the gateway refuses or fails at, rendered as OpenAI's error JSON."""

from __future__ import annotations

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    """An error with its HTTP status, in the shape OpenAI clients parse: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.upstream_status: int | None = None  # vLLM's status when this relays its error (404: model unknown)

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


# Constructors for the errors clients meet most; names follow openai-python's exception set.


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, type="permission_error", code="forbidden")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model '{model}' does not exist or you do not have access to it.",
                        param="model", code="model_not_found")


def payload_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


def upstream_unavailable(message: str) -> GatewayError:
    return GatewayError(502, message, type="api_error", code="upstream_unavailable")


def upstream_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, type="api_error", code="upstream_timeout")


def overloaded(message: str) -> GatewayError:
    return GatewayError(503, message, type="api_error", code="overloaded")


def error_response(e: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """The one way the gateway's own endpoints answer an error (the proxy path writes raw ASGI instead)."""
    return Response(e.to_json(), status_code=e.status, media_type="application/json",
                    headers={**e.headers, **(headers or {})} or None)

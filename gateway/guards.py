"""Input guards run before any stage uses a request: JSON nesting depth and headers that must come once.

Each guard is cheap on the common case (a C-speed byte count or one pass over a few headers) and
answers a 400 naming the limit or the header, never a 500 from deeper in the stack.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from gateway.errors import GatewayError, bad_request

# Headers a request may carry once only: two Authorization headers would let one part of the stack
# (or a proxy in front) read one key and another part the other.
SINGLE_HEADERS = frozenset({b"authorization", b"x-api-key"})


def check_depth(raw: bytes, parsed: Any, limit: int) -> None:
    """400 if arrays/objects nest deeper than `limit` (a deep body breaks orjson.dumps at ~254 levels).

    The bracket count of the raw body bounds the depth from above, so a usual body costs two C-speed
    counts and no walk; otherwise an iterative walk that stops at the first container too deep.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit or not isinstance(parsed, dict | list):
        return
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(parsed, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise bad_request(f"Request body nests arrays/objects deeper than the limit of {limit} levels.",
                              code="json_too_deep")
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))


def duplicated(raw_headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The name of a must-be-single header that occurs more than once, or None."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in SINGLE_HEADERS:
            if name in seen:
                return name
            seen.add(name)
    return None


def duplicate_header(name: bytes) -> GatewayError:
    header = name.decode("latin-1").title()
    return bad_request(f"Header '{header}' was sent more than once; send it exactly once.", param=header,
                       code="duplicate_header")


def bearer_matches(authorization: str | None, key: str) -> bool:
    """Constant-time check of 'Bearer <key>' (for the /metrics key)."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def credential(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The request's one credential: `Authorization`, or `X-Api-Key` as the anthropic SDK sends it. Both at
    once is a 400: parts of a stack (a proxy in front, a log) could read a different one than we do."""
    if x_api_key is not None:
        if authorization is not None:
            raise bad_request("Send one credential: both Authorization and X-Api-Key were sent.", param="x-api-key",
                              code="duplicate_credentials")
        authorization = b"Bearer " + x_api_key
    return authorization.decode("latin-1") if authorization is not None else None

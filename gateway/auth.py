"""Authenticate stage: API key (Bearer token) -> tenant. Keys are compared by their SHA-256 only."""

from __future__ import annotations

import hashlib

from gateway import errors
from gateway.config import GatewayConfig, Tenant

ANONYMOUS = Tenant("anonymous")


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self._keys = config.keys_by_sha256
        self.enabled = config.auth_enabled

    def authenticate(self, authorization: str | None) -> tuple[Tenant, str | None]:
        """Return the tenant and a short key fingerprint (for logs; never the key itself)."""
        if not self.enabled:
            return ANONYMOUS, None
        if not authorization:
            raise errors.unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        tenant = self._keys.get(digest)
        if tenant is None:
            raise errors.unauthorized("Incorrect API key provided.")
        return tenant, digest[:12]

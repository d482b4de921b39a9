"""How an upstream failure is classified: retried on the next deployment (Retryable) or answered as is.

One place for both the JSON calls (execute.py) and the streams (relay.py). Client-facing messages name
the deployment, never its address; the address and the OS error go to the gateway's own log.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import aiohttp
import orjson

from gateway import errors
from gateway.errors import GatewayError
from gateway.protocol import upstream_error
from gateway.upstream import DeploymentState

log = logging.getLogger("gateway.execute")


class Retryable(Exception):
    """This attempt failed in a way the next deployment may not: record why and move on.

    `blame` is what the deployment's circuit breaker learns: False (the deployment failed), or None
    (the gateway's own doing, e.g. its queue was full: says nothing about the deployment's health).
    """

    def __init__(self, reason: str, error: GatewayError, blame: bool | None = False) -> None:
        self.reason = reason
        self.error = error
        self.blame = blame


def not_connected(state: DeploymentState,
                  e: aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError) -> Retryable:
    """Refused, unreachable or timed out while connecting: vLLM never got the request, so try the next one."""
    if isinstance(e, aiohttp.ClientConnectorError):
        log.warning("cannot connect to deployment %s: %s", state.name, e.os_error.strerror or e)
        return Retryable("connect_error", errors.upstream_unavailable(
            f"cannot connect to deployment {state.name}: {_reason(e)}"))
    return Retryable("connect_timeout", errors.upstream_unavailable(
        f"cannot connect to deployment {state.name}: connect timeout"))


def refused(state: DeploymentState, status: int, data: bytes) -> Exception:
    """vLLM answered with an error status: 5xx and 429 are the deployment's trouble (next one), 4xx the request's."""
    err = upstream_error(status, json_or_none(data), state.name)
    err.upstream_status = status  # a 404 for a catalogue adapter: the engine lost it (gateway/routing/adapters.py)
    return Retryable(f"upstream_{status}", err) if status >= 500 or status == 429 else err


def _reason(e: aiohttp.ClientConnectorError) -> str:
    """Why a connection failed, without the address (clients must not learn upstream hosts and ports):
    the OS error's strerror may carry it ("Connect call failed ('10.0.0.7', 8000)"), its errno does not."""
    err = e.os_error
    if isinstance(err, socket.gaierror):
        return err.strerror or "name resolution failed"  # gai messages name no host
    return os.strerror(err.errno) if err.errno else type(err).__name__


def error_message(err: object) -> str:
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"][:200]
    return str(err)[:200]


def json_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None

"""Execute stage: pick a deployment, call vLLM, fall back to the next deployment before the first byte.

A failure before anything reached the client (connection refused, 5xx, timeout before the first
chunk) moves the request to the next deployment in the plan; once a stream has started it cannot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson

from gateway import errors
from gateway.config import Model
from gateway.errors import GatewayError
from gateway.protocol import UPSTREAM_PATHS, Endpoint, upstream_error
from gateway.record import Attempt, RequestRecord
from gateway.routing.balance import Balancing
from gateway.routing.breaker import BreakerState, CircuitBreaker
from gateway.routing.policy import Plan
from gateway.streaming import DONE, MalformedStream, StreamAccountant, chunk_has_token, sse_data, take_usage
from gateway.upstream import DeploymentState, UpstreamPool

T = TypeVar("T")
JSON = "application/json"


class _Retryable(Exception):
    """This attempt failed in a way the next deployment may not: record why and move on."""

    def __init__(self, reason: str, error: GatewayError) -> None:
        self.reason = reason
        self.error = error


@dataclass(slots=True)
class UpstreamStream:
    """A stream whose response headers and first chunk arrived; the relay takes it from here."""

    state: DeploymentState
    response: aiohttp.ClientResponse
    reader: SSEReader
    primed: list[bytes]  # data lines up to and including the first that carries a token


class Executor:
    def __init__(self, pool: UpstreamPool, breakers: dict[str, CircuitBreaker],
                 balancing: Balancing | None = None) -> None:
        self.pool = pool
        self.breakers = breakers
        self.balancing = balancing or Balancing(pool.config)
        self.queue_timeout = pool.config.server.queue_timeout

    def order(self, model: Model, body: dict[str, Any] | None = None,
              rec: RequestRecord | None = None) -> list[DeploymentState]:
        """The model's deployments in the order to try them, as its balance policy decides (routing/balance.py).

        LoRA affinity follows from the config: an adapter is a model whose deployments are the vLLM
        servers that load it, so its requests never reach a server without the adapter.
        """
        return self.balancing.order(model, [self.pool.states[d.name] for d in model.deployments], body, rec)

    async def _acquire(self, state: DeploymentState, rec: RequestRecord) -> None:
        if state.slots.locked():
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(self.queue_timeout):
                    await state.slots.acquire()
            except TimeoutError:
                raise _Retryable("queue_timeout", errors.overloaded(
                    f"deployment {state.name} is at its concurrency limit ({state.spec.max_concurrency}) "
                    f"and no slot freed within {self.queue_timeout:g}s")) from None
            finally:
                rec.queue_s += time.perf_counter() - t0
        else:
            await state.slots.acquire()
        state.in_flight += 1

    @staticmethod
    def _release(state: DeploymentState) -> None:
        state.in_flight -= 1
        state.slots.release()

    async def _attempt_in_order(self, rec: RequestRecord, plan: Plan, body: dict[str, Any],
                                attempt: Callable[[DeploymentState, bytes], Awaitable[T]], keep_slot: bool) -> T:
        """Try the plan's candidates and their deployments in order until one answers.

        Bounded by the plan's attempt count and time budget; deployments whose breaker is open are
        skipped without a call. Only failures before any byte reached the client come here.
        """
        last: GatewayError | None = None
        made = 0
        for model in plan.candidates:
            for state in self.order(model, body, rec):
                if made >= plan.max_attempts or time.perf_counter() - rec.started > plan.budget_s:
                    return self._give_up(rec, plan, last, made)
                breaker = self.breakers[state.name]
                upstream_model = state.spec.upstream_model
                if not breaker.allow():
                    rec.attempts.append(Attempt(state.name, upstream_model, "circuit_open", 0.0))
                    continue
                made += 1
                body["model"] = upstream_model
                t0 = time.perf_counter()
                acquired = succeeded = False
                try:
                    await self._acquire(state, rec)
                    acquired = True
                    result = await attempt(state, orjson.dumps(body))
                    succeeded = True
                except _Retryable as r:
                    breaker.record(False)
                    rec.attempts.append(Attempt(state.name, upstream_model, r.reason, time.perf_counter() - t0))
                    last = r.error
                    continue
                except GatewayError as e:
                    breaker.record(e.status < 500)  # a 4xx means the deployment itself is fine
                    rec.attempts.append(Attempt(state.name, upstream_model, f"error_{e.status}",
                                                time.perf_counter() - t0))
                    raise
                finally:
                    rec.upstream_s += time.perf_counter() - t0
                    if acquired and not (keep_slot and succeeded):
                        self._release(state)
                breaker.record(True)
                rec.attempts.append(Attempt(state.name, upstream_model, "ok", time.perf_counter() - t0))
                self._served_by(rec, plan, model, state)
                return result
        return self._give_up(rec, plan, last, made)

    @staticmethod
    def _give_up(rec: RequestRecord, plan: Plan, last: GatewayError | None, made: int) -> Any:
        if last is not None:
            raise last
        raise errors.GatewayError(503, f"No deployment of '{plan.name}' is available "
                                  f"(circuit breakers open or attempt budget spent after {made} attempts).",
                                  type="api_error", code="no_deployment_available")

    async def call(self, rec: RequestRecord, plan: Plan, endpoint: Endpoint, body: dict[str, Any]) -> bytes:
        """Non-streaming call; returns vLLM's response body unchanged."""
        path = UPSTREAM_PATHS[endpoint]

        async def attempt(state: DeploymentState, payload: bytes) -> bytes:
            return await self._post_json(state, path, rec, payload)

        return await self._attempt_in_order(rec, plan, body, attempt, keep_slot=False)

    async def _post_json(self, state: DeploymentState, path: str, rec: RequestRecord, payload: bytes) -> bytes:
        try:
            async with self.pool.session.post(
                state.spec.url + path, data=payload, timeout=state.timeout,
                headers={**state.headers, "Content-Type": JSON, "X-Request-Id": rec.request_id},
            ) as resp:
                data = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as e:
            raise _Retryable("connect_error", errors.upstream_unavailable(
                f"cannot connect to deployment {state.name}: {e.os_error.strerror or e}")) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            # The whole request took longer than the deployment's total timeout: vLLM did the work, so
            # repeating it elsewhere could double the cost; give an honest 504 instead.
            raise errors.upstream_timeout(
                f"deployment {state.name} did not answer within {state.spec.timeouts.total:g}s") from None
        except aiohttp.ClientError as e:
            raise _Retryable("upstream_disconnected", errors.upstream_unavailable(
                f"deployment {state.name} failed: {type(e).__name__}")) from None
        if status >= 400:
            err = upstream_error(status, _json_or_none(data), state.name)
            if status >= 500 or status == 429:
                raise _Retryable(f"upstream_{status}", err)
            raise err
        try:
            take_usage(rec, orjson.loads(data))
        except orjson.JSONDecodeError:
            raise _Retryable("malformed_response", errors.upstream_unavailable(
                f"deployment {state.name} returned a body that is not JSON")) from None
        return data

    async def open_stream(self, rec: RequestRecord, plan: Plan, endpoint: Endpoint,
                          body: dict[str, Any]) -> UpstreamStream:
        """Start a stream on the first deployment that answers with its first token; it keeps its slot."""
        path = UPSTREAM_PATHS[endpoint]

        async def attempt(state: DeploymentState, payload: bytes) -> UpstreamStream:
            return await self._open(state, path, rec, payload)

        return await self._attempt_in_order(rec, plan, body, attempt, keep_slot=True)

    async def count_tokens(self, model: Model, body: dict[str, Any]) -> tuple[int, int] | None:
        """Prompt tokens and context window from vLLM's /tokenize, asking the model's deployments in
        order; None when none can answer (the execute stage then finds out which deployment works)."""
        req: dict[str, Any] = {"messages": body["messages"]} if "messages" in body else {
            "prompt": body.get("prompt", "")}
        for state in self.order(model):
            if state.healthy is False or self.breakers[state.name].state is BreakerState.OPEN:
                continue
            req["model"] = state.spec.upstream_model
            try:
                async with self.pool.session.post(state.spec.url + "/tokenize", data=orjson.dumps(req),
                                                  timeout=state.timeout,
                                                  headers={**state.headers, "Content-Type": JSON}) as r:
                    data = orjson.loads(await r.read())
            except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
                continue
            count = data.get("count") if isinstance(data, dict) else None
            window = model.context_window or (data.get("max_model_len") if isinstance(data, dict) else None)
            if isinstance(count, int) and isinstance(window, int):
                return count, window
        return None

    async def _open(self, state: DeploymentState, path: str, rec: RequestRecord, payload: bytes) -> UpstreamStream:
        first_token = state.spec.timeouts.first_token
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(first_token):
                resp = await self.pool.session.post(
                    state.spec.url + path, data=payload, timeout=state.stream_timeout,
                    headers={**state.headers, "Content-Type": JSON, "X-Request-Id": rec.request_id},
                )
                if resp.status >= 400:
                    data = await resp.read()
                    resp.release()
                    err = upstream_error(resp.status, _json_or_none(data), state.name)
                    if resp.status >= 500 or resp.status == 429:
                        raise _Retryable(f"upstream_{resp.status}", err)
                    raise err
                reader = SSEReader(resp)
                primed = await _read_until_first_token(reader)
        except aiohttp.ClientConnectorError as e:
            raise _Retryable("connect_error", errors.upstream_unavailable(
                f"cannot connect to deployment {state.name}: {e.os_error.strerror or e}")) from None
        except TimeoutError:
            if resp is not None:
                resp.close()
            raise _Retryable("first_token_timeout", errors.upstream_timeout(
                f"deployment {state.name} sent no first chunk within {first_token:g}s")) from None
        except aiohttp.ClientError as e:
            if resp is not None:
                resp.close()
            raise _Retryable("upstream_disconnected", errors.upstream_unavailable(
                f"deployment {state.name} failed before the first chunk: {type(e).__name__}")) from None
        if not primed:
            resp.close()
            raise _Retryable("empty_stream", errors.upstream_unavailable(
                f"deployment {state.name} closed the stream before the first chunk"))
        return UpstreamStream(state, resp, reader, primed)

    async def relay(self, stream: UpstreamStream, rec: RequestRecord, acct: StreamAccountant,
                    on_done: Callable[[], bytes]) -> AsyncIterator[bytes]:
        """Yield the client's SSE bytes as they arrive; always end with [DONE]; account in every case.

        Each network read from vLLM becomes one write to the client: chunks that arrived together
        leave together (one syscall), and a chunk is never held back waiting for the next one.
        """
        resp, completed = stream.response, False
        try:
            batch: list[bytes] | None = stream.primed
            while batch is not None and not completed:
                out = []
                for line in batch:
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        completed = acct.upstream_error is None
                        break
                    chunk = acct.on_data(payload)
                    if chunk is not None:
                        out.append(chunk)
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
                if completed or acct.upstream_error is not None:
                    break
                t0 = time.perf_counter()
                try:
                    batch = await stream.reader.next_lines()
                finally:
                    rec.upstream_s += time.perf_counter() - t0
            if completed:
                acct.done()
                yield on_done()
                yield DONE
                return
            if acct.upstream_error is not None:
                rec.outcome, rec.status = "upstream_failed_midstream", 502
                rec.error_code = str(acct.upstream_error.get("code") or "upstream_error")
                yield DONE
                return
            raise aiohttp.ClientPayloadError("stream ended without [DONE]")
        except (TimeoutError, aiohttp.ClientError, MalformedStream) as e:
            # Too late to fall back: tell the client honestly, with no fake finish_reason.
            acct.done()
            rec.outcome, rec.status, rec.error_code = "upstream_failed_midstream", 502, "upstream_stream_broken"
            reason = str(e) if isinstance(e, MalformedStream) else type(e).__name__
            err = errors.GatewayError(502, f"upstream {stream.state.name} failed mid-stream: {reason}",
                                      type="api_error", code="upstream_stream_broken")
            yield sse_data(err.body())
            yield DONE
        except BaseException:
            # Client went away (task cancelled / generator closed): stop vLLM's work, keep the account.
            acct.done()
            rec.outcome, rec.status = "client_disconnected", 499
            raise
        finally:
            if completed:
                resp.release()
            else:
                resp.close()  # drops the connection: vLLM sees the disconnect and aborts the request
            self._release(stream.state)

    @staticmethod
    def _served_by(rec: RequestRecord, plan: Plan, model: Model, state: DeploymentState) -> None:
        rec.served_model = model.name
        rec.deployment = state.name
        rec.upstream_model = state.spec.upstream_model
        rec.concurrency = state.in_flight
        failed = [a for a in rec.attempts if a.outcome != "ok"]
        if failed:
            rec.fallback_reason = failed[-1].outcome
            if model is not plan.candidates[0]:
                rec.rule = "failure_fallback"


class SSEReader:
    """Splits vLLM's event stream into `data:` lines, a whole network read at a time."""

    __slots__ = ("_content", "_tail")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._content = resp.content
        self._tail = b""

    async def next_lines(self) -> list[bytes] | None:
        """The complete `data:` lines of the next read(s) (at least one); None at end of stream."""
        while True:
            data = await self._content.readany()
            if not data:
                return None
            if self._tail:
                data = self._tail + data
            parts = data.split(b"\n")
            self._tail = parts.pop()
            lines = [p for p in parts if p.startswith(b"data:")]
            if lines:
                return lines


async def _read_until_first_token(reader: SSEReader) -> list[bytes]:
    """Hold back the chunks before the first token (vLLM's role-only chunk), so that a deployment that
    stalls before its first token can still be left for another without the client seeing a byte."""
    lines: list[bytes] = []
    while True:
        batch = await reader.next_lines()
        if batch is None:
            return lines
        lines.extend(batch)
        for line in batch:
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return lines
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return lines  # the relay reports it
            if not isinstance(obj, dict) or "error" in obj or not obj.get("choices"):
                return lines
            choices = obj["choices"]
            if chunk_has_token(choices) or any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
                return lines


def _json_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


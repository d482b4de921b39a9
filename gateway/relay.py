"""Reading vLLM's event stream: the SSE reader, the relay to the client, and what happens when a stream is left.

A stream that is left early (the client went away, a first-token timeout, shutdown) is not just dropped:
the gateway half-closes its side of the upstream connection. vLLM's server (uvicorn) takes the EOF as a
disconnect and aborts the request, but still flushes what it had already written; the gateway reads that
to the end and tallies it, so the record holds what vLLM really did, not what the client happened to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from gateway import errors
from gateway.record import Attempt, RequestRecord
from gateway.streaming import MalformedStream, StreamAccountant, UsageTally, chunk_has_token
from gateway.upstream import DeploymentState
from gateway.upstream_errors import Retryable, error_message, not_connected, refused

if TYPE_CHECKING:
    from gateway.apis.events import EventAccountant

log = logging.getLogger("gateway.relay")

# A left stream delivers what vLLM wrote before it saw the EOF: at most DRAIN_S in all (a slow reader may
# leave megabytes in the buffers), and it stops as soon as nothing arrived for DRAIN_IDLE_S (an upstream
# that stalled has nothing more to say; vLLM itself closes within milliseconds of the EOF).
DRAIN_S = 3.0
DRAIN_IDLE_S = 0.25


class SSEReader:
    """Splits vLLM's event stream into `data:` lines, a whole network read at a time."""

    __slots__ = ("_content", "_tail", "lines")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._content = resp.content
        self._tail = b""
        self.lines: list[bytes] | None = None  # when set, every line read is also kept here

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
                if self.lines is not None:
                    self.lines.extend(lines)
                return lines


class FirstChunkError(Exception):
    """vLLM answered the stream with an error event before its first token."""

    def __init__(self, error: object) -> None:
        super().__init__(str(error))
        self.error = error


async def read_until_first_token(reader: SSEReader, lines: list[bytes],
                                 started: Callable[[Any], bool] | None = None) -> list[bytes]:
    """Hold back the chunks before the first token (vLLM's role-only chunk), so that a deployment that
    stalls before its first token can still be left for another without the client seeing a byte.
    The lines go into `lines` as they are read, so what was read survives a timeout or cancellation.
    `started` decides it for the named-event APIs (gateway/apis/: Responses, Messages)."""
    reader.lines = lines
    try:
        while True:
            batch = await reader.next_lines()
            if batch is None:
                return lines
            for line in batch:
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return lines
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    return lines  # the relay reports it
                if not isinstance(obj, dict):
                    return lines
                if started is not None:
                    if started(obj):
                        return lines
                    continue
                if "error" in obj and "choices" not in obj:
                    raise FirstChunkError(obj["error"])
                choices = obj.get("choices")
                if not choices:
                    continue
                if chunk_has_token(choices) or any(isinstance(c, dict) and c.get("finish_reason")
                                                   for c in choices):
                    return lines
    finally:
        reader.lines = None


def tally_lines(lines: list[bytes], n: int) -> UsageTally:
    tally = UsageTally(n)
    for line in lines:
        try:
            obj = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
            with contextlib.suppress(ValueError):
                tally.add(obj["usage"], obj.get("choices"))
    return tally


async def drain(resp: aiohttp.ClientResponse, reader: SSEReader, on_line: Callable[[bytes], object]) -> None:
    """Leave a stream honestly: half-close (vLLM aborts), read what it had written until EOF, then close."""
    conn = resp.connection
    transport = conn.transport if conn is not None else None
    try:
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        loop = asyncio.get_running_loop()
        end = loop.time() + DRAIN_S
        while True:
            async with asyncio.timeout(min(DRAIN_IDLE_S, max(0.0, end - loop.time()))):
                batch = await reader.next_lines()
            if batch is None:
                break
            for line in batch:
                on_line(line)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass  # vLLM closed mid-chunk (it aborted), or took too long: what was read is what counts
    finally:
        resp.close()


@dataclass(slots=True)
class UpstreamStream:
    """A stream whose response headers and first token arrived; the relay takes it from here."""

    state: DeploymentState
    attempt: Attempt
    response: aiohttp.ClientResponse
    reader: SSEReader
    primed: list[bytes]  # data lines up to and including the first that carries a token
    finish: Callable[[], None]  # frees the deployment slot and closes the attempt's timing (once)


class Relay:
    """Moves one upstream stream to the client, a network read at a time; accounts it however it ends."""

    __slots__ = ("stream", "rec", "acct", "on_done", "usage_less", "completed", "ended")

    def __init__(self, stream: UpstreamStream, rec: RequestRecord, acct: StreamAccountant | EventAccountant,
                 on_done: Callable[[], bytes], usage_less: Callable[[], Awaitable[None]] | None = None) -> None:
        self.stream = stream
        self.rec = rec
        self.acct = acct
        self.on_done = on_done
        # A complete stream whose end carried no usage: counts the prompt before the record is final.
        self.usage_less = usage_less
        self.completed = False  # vLLM sent [DONE] after a clean stream
        self.ended = False  # the upstream side is finished with (read to the end, failed, or drained)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The client's SSE bytes as they arrive; always ends with [DONE] (an error event before it on failure).

        Each network read from vLLM becomes one write to the client: chunks that arrived together leave
        together (one syscall), and a chunk is never held back waiting for the next one.
        """
        rec, acct, stream = self.rec, self.acct, self.stream
        try:
            batch: list[bytes] | None = stream.primed
            while batch is not None:
                out = []
                for line in batch:
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        self.completed = acct.upstream_error is None
                        break
                    chunk = acct.on_data(payload)
                    if chunk is not None:
                        out.append(chunk)
                    if acct.finished:  # APIs without [DONE] (gateway/apis/) end with a terminal event
                        self.completed = acct.upstream_error is None
                        break
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
                if self.completed or acct.upstream_error is not None or acct.finished:
                    break
                t0 = time.perf_counter()
                try:
                    batch = await stream.reader.next_lines()
                finally:
                    rec.timing.upstream_s += time.perf_counter() - t0
            self.ended = True
            self._close()
            if self.completed:
                acct.done()
                if self.usage_less is not None and getattr(acct, "usage_final", True) is False:
                    await self.usage_less()
                yield self.on_done() + acct.end_marker
                return
            if acct.upstream_error is not None:
                acct.done()
                rec.end.outcome, rec.end.status = "upstream_failed_midstream", 502
                rec.end.error_code = str(acct.upstream_error.get("code") or "upstream_error")
                if acct.end_marker:
                    yield acct.end_marker
                return
            raise aiohttp.ClientPayloadError("stream ended before its end marker")
        except (TimeoutError, aiohttp.ClientError, MalformedStream) as e:
            # Too late to fall back: tell the client honestly, with no fake finish_reason.
            self.ended = True
            self._close()
            acct.done()
            end = rec.end
            end.outcome, end.status, end.error_code = "upstream_failed_midstream", 502, "upstream_stream_broken"
            reason = str(e) if isinstance(e, MalformedStream) else type(e).__name__
            err = errors.GatewayError(502, f"upstream {stream.state.name} failed mid-stream: {reason}",
                                      type="api_error", code="upstream_stream_broken")
            yield acct.error_event(err) + acct.end_marker

    async def abandon(self) -> None:
        """The client left (or the gateway is stopping): stop vLLM's work and account what it did."""
        if self.ended:
            return
        self.ended = True

        def on_line(line: bytes) -> None:
            payload = line[5:].strip()
            if payload != b"[DONE]":
                with contextlib.suppress(MalformedStream):
                    self.acct.on_data(payload)

        t0 = time.perf_counter()
        try:
            await drain(self.stream.response, self.stream.reader, on_line)
        finally:
            self.rec.timing.upstream_s += time.perf_counter() - t0
            self.acct.done()
            self.stream.finish()

    def _close(self) -> None:
        resp = self.stream.response
        if self.completed:
            resp.release()
        else:
            resp.close()  # drops the connection: vLLM sees the disconnect and aborts the request
        self.stream.finish()


async def open_upstream_stream(session: aiohttp.ClientSession, state: DeploymentState, path: str,
                               rec: RequestRecord, payload: bytes, att: Attempt, started: Any,
                               tally_of: Callable[[list[bytes]], UsageTally]) -> UpstreamStream:
    """Send one stream attempt and hold it until its first token (so that it can still fall back); an
    attempt given up on is drained, and what vLLM did for it is counted as the attempt's.

    `started` tells the API's first output apart (read_until_first_token); `tally_of` reads the API's usage.
    """
    first_token = state.spec.timeouts.first_token
    resp: aiohttp.ClientResponse | None = None
    reader: SSEReader | None = None
    seen: list[bytes] = []

    async def leave() -> None:
        """This attempt is abandoned: make vLLM stop and count what it did as this attempt's."""
        if resp is None:
            att.usage = "unknown"  # cut off before vLLM answered: it reports nothing for an abort
            return
        if reader is not None:
            await drain(resp, reader, seen.append)
        else:
            resp.close()
        tally = tally_of(seen)
        if tally.reported:
            att.usage = "reported"
            att.prompt_tokens, att.fanout_prompt_tokens = tally.prompt, tally.fanout_prompt
            att.completion_tokens = tally.completion

    try:
        async with asyncio.timeout(first_token):
            resp = await session.post(
                state.spec.url + path, data=payload, timeout=state.stream_timeout,
                headers=trace_headers(rec, {**state.headers, "Content-Type": "application/json",
                                             "X-Request-Id": rec.identity.request_id}),
            )
            if resp.status >= 400:
                data = await resp.read()
                resp.release()
                status, resp = resp.status, None
                raise refused(state, status, data)
            reader = SSEReader(resp)
            primed = await read_until_first_token(reader, seen, started)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        raise not_connected(state, e) from None
    except TimeoutError:
        await leave()
        raise Retryable("first_token_timeout", errors.upstream_timeout(
            f"deployment {state.name} sent no first chunk within {first_token:g}s")) from None
    except FirstChunkError as e:
        await leave()
        raise Retryable("upstream_error_event", errors.upstream_unavailable(
            f"deployment {state.name} answered with an error before its first token: "
            f"{error_message(e.error)}")) from None
    except aiohttp.ClientError as e:
        await leave()
        raise Retryable("upstream_disconnected", errors.upstream_unavailable(
            f"deployment {state.name} failed before the first token: {type(e).__name__}")) from None
    except asyncio.CancelledError:
        await leave()
        raise
    assert resp is not None and reader is not None
    if not primed:
        await leave()
        raise Retryable("empty_stream", errors.upstream_unavailable(
            f"deployment {state.name} closed the stream before the first token"))
    return UpstreamStream(state, att, resp, reader, primed, _unset)


def trace_headers(rec: RequestRecord, headers: dict[str, str]) -> dict[str, str]:
    """The attempt span as vLLM's parent (W3C traceparent): vLLM's llm_request span joins the trace."""
    if rec.trace is not None:
        headers["traceparent"] = rec.trace.traceparent
        if rec.trace.tracestate:
            headers["tracestate"] = rec.trace.tracestate
    return headers


def _unset() -> None:
    raise AssertionError("UpstreamStream.finish is set by the executor")

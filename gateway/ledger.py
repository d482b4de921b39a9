"""Usage ledger: each finished request's record buffered (bounded by bytes), written in batches with usage sums.

`append` is called by the finalizer and never blocks: the record's JSON line (no prompt text) goes into
a buffer bounded by records and by bytes; a background task writes it in batches to the ledger backend
(Redis, else the embedded SQLite file, see build_ledger_backend). Each batch carries the per (tenant,
day, hour, model) sums of its records (gateway/usage.py) and is written with them in one transaction,
so `/v1/usage` reads aggregates instead of scanning. A batch is frozen once taken and re-sent as it is
until a write succeeds: the backend applies a (writer, sequence) pair at most once.

With Redis, what a write could not deliver goes to the spool (gateway/spool.py), a local file, at once:
the failed batch with its (writer, sequence) and everything buffered. The flush loop replays the spool
when Redis answers again, and a gateway started on the same file replays what a killed one left. A
writer whose batch went to the spool is retired (the next batches get a new writer id), so the spool's
batches never race a live write of the same writer. Only when the spool refuses (full, unwritable) do
records stay in memory, where a full buffer drops and counts them (gateway_ledger_dropped_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import logging
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from gateway import usage
from gateway.config import GatewayConfig
from gateway.spool import Spool, SpoolError
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway.ledger")

BATCH = 500
READ_BATCH = 2000
REPLAY_READ = 20  # spooled batches read at a time
CLOSE_REPLAY_S = 5.0  # at shutdown with Redis answering, the spool's replay gets this long (the rest: next start)
SEEN_WINDOW = 100_000
# Records reach the ledger after they finished (buffered while the backend was away): a time-range
# read also looks at entries written up to this much before its start, then filters on the record's ts.
LATE_MARGIN_S = 6 * 3600

CSV_FIELDS = ("ts", "request_id", "tenant", "api_key", "endpoint", "requested_model", "served_model",
              "upstream_model", "deployment", "stream", "status", "outcome", "error_code", "cache",
              "limited_by", "prompt_tokens", "completion_tokens", "cached_tokens", "fanout_prompt_tokens",
              "wasted_prompt_tokens", "wasted_completion_tokens", "cost_usd", "cost_pico_usd", "saved_usd",
              "saved_pico_usd", "wasted_cost_pico_usd",
              "prefix_saved_pico_usd",
              "e2e_ms", "ttft_ms", "tpot_ms", "overhead_ms")


class LedgerBackend(Protocol):
    """Where batches go: the Redis stream + hashes, the SQLite file, or (path: memory) this process."""

    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def ledger_write(self, writer: str, seq: int, entries: Sequence[bytes], groups: usage.Groups) -> None:
        """Append the entries and add the groups to the aggregates, atomically; (writer, seq) at most once."""
        ...

    async def ledger_read(self, cursor: str | None, start_ts: float | None,
                          count: int) -> tuple[list[bytes], str | None]:
        """Up to `count` entries after `cursor` (None: from start_ts - margin); the next cursor, None at the end."""
        ...

    async def usage_groups(self, tenant: str | None, lo_hour: int | None, hi_hour: int | None) -> usage.Groups:
        """The aggregates of one tenant (None: all) in hours [lo_hour, hi_hour) (None: unbounded)."""
        ...


@dataclass(slots=True)
class _Batch:
    seq: int
    lines: list[bytes]
    size: int
    groups: usage.Groups


class Ledger:
    def __init__(self, backend: LedgerBackend, capacity: int, flush_interval_s: float,
                 on_buffered: Callable[[int], None], on_dropped: Callable[[int], None],
                 max_bytes: int = 8 * 1024 * 1024, spool: Spool | None = None,
                 on_replayed: Callable[[int], None] | None = None) -> None:
        self.backend = backend
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.interval = flush_interval_s
        self.buffer: deque[bytes] = deque()
        self.buffered_bytes = 0  # in `buffer` and the pending batch
        self.dropped = 0
        self.writer = uuid.uuid4().hex[:16]  # this process, for the backend's at-most-once check
        self._seq = itertools.count(1)
        self._pending: _Batch | None = None
        self._on_buffered = on_buffered
        self._on_dropped = on_dropped
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()  # everything that takes from `buffer` / `_pending`, one at a time
        self._last_drop_log = 0.0
        self.spool = spool
        self._on_replayed = on_replayed or (lambda n: None)
        self._spool_writer = "s" + uuid.uuid4().hex[:15]  # batches made of buffered records when spilled
        self._spool_seq = itertools.count(1)
        self._replay_lock = asyncio.Lock()
        # Records accepted so far, and how many of them (the oldest: they leave in order) are done with:
        # written to the backend, in the spool, or given up. The ledger gate waits on `done`.
        self.appended = 0
        self.done = 0

    def __len__(self) -> int:
        return len(self.buffer) + (len(self._pending.lines) if self._pending else 0)

    def append(self, line: bytes) -> None:
        """From the finalizer: queue the record's JSON line; drop (and count) it only if the buffer is full."""
        if len(self) >= self.capacity or self.buffered_bytes + len(line) > self.max_bytes:
            self.dropped += 1
            self._on_dropped(1)
            now = asyncio.get_running_loop().time()
            if now - self._last_drop_log >= 10.0:
                self._last_drop_log = now
                log.error("ledger buffer full (%d records, %d bytes): records are being dropped (%d so far)",
                          len(self), self.buffered_bytes, self.dropped)
            return
        # orjson.dumps returns bytes that keep a ~16 KB allocation whatever their length: held for
        # seconds (or while the backend is away) that is 16x the line. A copy is exactly its length.
        self.buffer.append(bytes(memoryview(line)))
        self.appended += 1
        self.buffered_bytes += len(line)
        self._on_buffered(len(self))
        if len(self.buffer) >= BATCH:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ledger-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.flush()
            if self.spool is not None and self.spool.batches:  # Redis answers: what is spooled goes now
                with contextlib.suppress(StoreUnavailable, TimeoutError):
                    await asyncio.wait_for(self.replay(), CLOSE_REPLAY_S)
        except StoreUnavailable:
            await self.spill()  # Redis away: to the spool, replayed by the next start
        if len(self):
            log.error("ledger: %d records could not be written before shutdown (nor spooled): dropped", len(self))
            self.dropped += len(self)
            self._on_dropped(len(self))

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                if self.spool is not None and self.spool.batches:
                    await self.replay()  # also the probe: fails fast while Redis is away
                await self.flush()
            except StoreUnavailable:
                await self.spill()  # what memory holds goes to disk now, not when the buffer overflows
                await asyncio.sleep(min(1.0, self.interval * 5))  # back off; the records stay buffered

    def _take(self) -> _Batch:
        lines = [self.buffer.popleft() for _ in range(min(BATCH, len(self.buffer)))]
        return _Batch(next(self._seq), lines, sum(map(len, lines)), usage.fold(_decoded(lines)))

    async def flush(self) -> None:
        """Write everything buffered; on failure the unwritten records stay (the taken batch unchanged)."""
        async with self._flush_lock:
            while self._pending is not None or self.buffer:
                if self._pending is None:
                    self._pending = self._take()
                b = self._pending
                await self.backend.ledger_write(self.writer, b.seq, b.lines, b.groups)
                self._pending = None
                self._gone(len(b.lines), b.size)

    def _gone(self, n: int, size: int) -> None:
        self.done += n
        self.buffered_bytes -= size
        self._on_buffered(len(self))

    async def spill(self) -> bool:
        """Everything held in memory to the spool; True when nothing is left in memory.

        Runs as a task of its own, shielded: the caller (a response whose client left, shutdown) may be
        cancelled, the bookkeeping after the file's commit must not be (else records both spooled and
        buffered would be written twice)."""
        if self.spool is None:
            return not len(self)
        return await asyncio.shield(asyncio.ensure_future(self._spill()))

    async def _spill(self) -> bool:
        assert self.spool is not None
        async with self._flush_lock:
            if self._pending is None and not self.buffer:
                return True
            batches: list[tuple[str, int, list[bytes]]] = []
            if self._pending is not None:  # a write of it failed: it keeps its identity (it may have been applied)
                batches.append((self.writer, self._pending.seq, self._pending.lines))
            rest = list(self.buffer)
            for i in range(0, len(rest), BATCH):
                batches.append((self._spool_writer, next(self._spool_seq), rest[i:i + BATCH]))
            try:
                stored = await self.spool.put_batches(batches)
            except SpoolError:
                return False
            for k, (writer, _, lines) in enumerate(batches[:stored]):
                if k == 0 and self._pending is not None and writer == self.writer:
                    self._pending = None
                    # retire the writer: its spooled batch must reach Redis before any later one of it
                    self.writer, self._seq = uuid.uuid4().hex[:16], itertools.count(1)
                    self._gone(len(lines), sum(map(len, lines)))
                else:
                    for _ in lines:
                        self.buffer.popleft()  # appends only add on the right meanwhile
                    self._gone(len(lines), sum(map(len, lines)))
            return stored == len(batches)

    async def replay(self) -> int:
        """Write the spooled batches to the backend, oldest first, each deleted once written; how many records.
        Raises StoreUnavailable (the rest stays spooled). One replayer per spool file at a time."""
        if self.spool is None:
            return 0
        n = 0
        async with self._replay_lock:
            with self.spool.replayer() as mine:
                if not mine:
                    return 0
                after = 0
                while True:
                    try:
                        rows = await self.spool.read_batches(after, REPLAY_READ)
                    except SpoolError:
                        return n
                    if not rows:
                        break
                    for batch_id, writer, seq, lines in rows:
                        groups = usage.fold(_decoded(lines))
                        await self.backend.ledger_write(writer, seq, lines, groups)
                        with contextlib.suppress(SpoolError):  # left there: replayed again, changes nothing
                            await self.spool.delete_batch(batch_id)
                        after = batch_id
                        n += len(lines)
                        self._on_replayed(len(lines))
        if n:
            log.warning("ledger: %d spooled records replayed to %s", n, self.backend.name)
        return n

    async def records(self, start_ts: float | None = None, end_ts: float | None = None,
                      tenant: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Ledger records with start_ts <= ts < end_ts (unix seconds), optionally of one tenant."""
        # Redis takes a batch's entries once (LEDGER_LUA); a stream written by an older gateway may hold a
        # batch re-sent after a lost reply twice, a few batches apart: remembering the last SEEN_WINDOW
        # records finds such repeats without growing with the ledger.
        seen: set[tuple[str, float]] = set()
        order: deque[tuple[str, float]] = deque()
        cursor: str | None = None
        while True:
            rows, cursor = await self.backend.ledger_read(cursor, start_ts, READ_BATCH)
            for raw in rows:
                r = orjson.loads(raw)
                ts = r.get("ts", 0.0)
                if (start_ts is not None and ts < start_ts) or (end_ts is not None and ts >= end_ts):
                    continue
                if tenant is not None and r.get("tenant") != tenant:
                    continue
                ident = (r.get("request_id"), ts)
                if ident in seen:
                    continue
                seen.add(ident)
                order.append(ident)
                if len(order) > SEEN_WINDOW:
                    seen.discard(order.popleft())
                yield r
            if cursor is None:
                return

    async def usage(self, start_ts: float | None, end_ts: float | None, tenant: str | None) -> dict[str, Any]:
        """Totals by tenant, model and UTC day, from the aggregates, over whole UTC hours (see gateway/usage.py)."""
        lo, hi = usage.hour_bounds(start_ts, end_ts)
        groups = await self.backend.usage_groups(tenant, lo, hi)
        return usage.response(groups, tenant, start_ts, end_ts)

    async def export(self, out: IO[str], fmt: str, start_ts: float | None = None, end_ts: float | None = None,
                     tenant: str | None = None) -> int:
        n = 0
        writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore") if fmt == "csv" else None
        if writer is not None:
            writer.writeheader()
        async for r in self.records(start_ts, end_ts, tenant):
            if writer is not None:
                writer.writerow(r)
            else:
                out.write(orjson.dumps(r).decode() + "\n")
            n += 1
        return n


def _decoded(lines: Sequence[bytes]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:  # never expected: the finalizer wrote it
            log.error("ledger: a record is not valid JSON; kept in the ledger, left out of the usage sums")
    return records


def parse_time(value: str | None) -> float | None:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def sqlite_path(config: GatewayConfig) -> str:
    """The embedded ledger's file: ledger.path, else ledger.sqlite3 in $GATEWAY_STATE_DIR (~/.cache/vllm-gateway)."""
    p = config.features.ledger.path
    if p:
        return p
    state = os.environ.get("GATEWAY_STATE_DIR") or str(Path.home() / ".cache" / "vllm-gateway")
    return str(Path(state) / "ledger.sqlite3")


def build_ledger_backend(config: GatewayConfig, store: Any) -> LedgerBackend:
    """Redis (the store itself) when a URL is set; else the SQLite file, or this process with `path: memory`."""
    if config.features.redis.url:
        return store  # type: ignore[no-any-return]
    spec = config.features.ledger
    if spec.path == "memory":
        from gateway.ledger_memory import MemoryLedger

        return MemoryLedger(spec.memory_bytes, spec.usage_days)
    from gateway.ledger_sqlite import SqliteLedger

    return SqliteLedger(sqlite_path(config), spec.max_rows, spec.max_age_days, spec.usage_days)

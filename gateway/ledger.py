"""Usage ledger: every finished request's record appended to a stream (bounded buffer, flush loop), usage, export.

`append` is called by the finalizer and never blocks: the record (its log dict, no prompt text) goes
into a bounded in-memory buffer; a background task writes the buffer to the store in batches. While
the store is away the buffer keeps the records and the loop retries; what overflows the buffer is
counted (gateway_ledger_dropped_total). Usage totals and exports read the stream back.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from gateway.store import Store, StoreUnavailable

log = logging.getLogger("gateway.ledger")

BATCH = 500
READ_BATCH = 2000
# Records reach the stream after they finished (buffered while the store was away): a time-range
# query also scans stream ids up to this much older than its start, then filters on the record's ts.
LATE_MARGIN_MS = 6 * 3600 * 1000

CSV_FIELDS = ("ts", "request_id", "tenant", "api_key", "endpoint", "requested_model", "served_model",
              "upstream_model", "deployment", "stream", "status", "outcome", "error_code", "cache",
              "limited_by", "prompt_tokens", "completion_tokens", "cached_tokens", "fanout_prompt_tokens",
              "wasted_prompt_tokens", "wasted_completion_tokens", "cost_usd", "cost_pico_usd", "saved_usd",
              "saved_pico_usd", "wasted_cost_pico_usd",
              "prefix_saved_pico_usd",
              "e2e_ms", "ttft_ms", "tpot_ms", "overhead_ms")


class Ledger:
    def __init__(self, store: Store, capacity: int, flush_interval_s: float,
                 on_buffered: Callable[[int], None], on_dropped: Callable[[int], None]) -> None:
        self.store = store
        self.capacity = capacity
        self.interval = flush_interval_s
        self.buffer: deque[bytes] = deque()
        self.dropped = 0
        self._on_buffered = on_buffered
        self._on_dropped = on_dropped
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def append(self, line: bytes) -> None:
        """From the finalizer: queue the record's JSON line; drop (and count) it only if the buffer is full."""
        if len(self.buffer) >= self.capacity:
            self.dropped += 1
            self._on_dropped(1)
            log.error("ledger buffer full (%d records): a record was dropped", self.capacity)
            return
        self.buffer.append(line)
        self._on_buffered(len(self.buffer))
        if len(self.buffer) >= BATCH:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ledger-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
        if self.buffer:
            log.error("ledger: %d records could not be written before shutdown", len(self.buffer))

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.flush()
            except StoreUnavailable:
                await asyncio.sleep(min(1.0, self.interval * 5))  # back off; the records stay buffered

    async def flush(self) -> None:
        """Write everything buffered; on failure the unwritten records stay, in order."""
        async with self._flush_lock:
            while self.buffer:
                batch = [self.buffer[i] for i in range(min(BATCH, len(self.buffer)))]
                await self.store.ledger_append(batch)
                for _ in batch:
                    self.buffer.popleft()
                self._on_buffered(len(self.buffer))

    async def records(self, start_ts: float | None = None, end_ts: float | None = None,
                      tenant: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Ledger records with start_ts <= ts < end_ts (unix seconds), optionally of one tenant."""
        cursor = "-" if start_ts is None else str(max(0, int(start_ts * 1000) - LATE_MARGIN_MS))
        seen: set[tuple[str, float]] = set()  # a batch re-sent after a lost reply is written twice
        while True:
            rows = await self.store.ledger_range(cursor, "+", READ_BATCH)
            for _, raw in rows:
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
                yield r
            if len(rows) < READ_BATCH:
                return
            cursor = "(" + rows[-1][0]

    async def usage(self, start_ts: float | None, end_ts: float | None, tenant: str | None) -> dict[str, Any]:
        """Totals by tenant, model and UTC day. Tokens served from the gateway's cache are counted apart:
        prompt/completion tokens and cost are what vLLM processed (they match its own counters)."""
        groups: dict[tuple[str, str, str], dict[str, Any]] = {}
        async for r in self.records(start_ts, end_ts, tenant):
            day = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d")
            model = r.get("served_model") or r.get("requested_model") or "_unknown"
            g = groups.get((r["tenant"], model, day))
            if g is None:
                g = groups[(r["tenant"], model, day)] = {
                    "tenant": r["tenant"], "model": model, "day": day, **_zero()}
            _add(g, r)
        data = sorted(groups.values(), key=lambda g: (g["day"], g["tenant"], g["model"]))
        totals = _zero()
        for g in data:
            for k in totals:
                if k not in ("cost_usd", "saved_usd"):
                    totals[k] += g[k]
        totals["cost_usd"] = totals["cost_pico_usd"] / 10**12
        totals["saved_usd"] = totals["saved_pico_usd"] / 10**12
        return {"object": "usage", "tenant": tenant, "start": start_ts, "end": end_ts, "data": data,
                "totals": totals}

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


def _zero() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "cached_prompt_tokens": 0, "cache_hit_prompt_tokens": 0, "cache_hit_completion_tokens": 0,
            "cost_usd": 0.0, "saved_usd": 0.0, "cost_pico_usd": 0, "saved_pico_usd": 0,
            "fanout_prompt_tokens": 0, "wasted_prompt_tokens": 0, "wasted_completion_tokens": 0,
            "wasted_cost_pico_usd": 0, "prefix_saved_pico_usd": 0}


def _add(g: dict[str, Any], r: dict[str, Any]) -> None:
    g["requests"] += 1
    if r.get("status", 0) >= 400:
        g["errors"] += 1
    if r.get("cache") == "hit":
        g["cache_hits"] += 1
        g["cache_hit_prompt_tokens"] += r.get("prompt_tokens", 0)
        g["cache_hit_completion_tokens"] += r.get("completion_tokens", 0)
    else:
        g["prompt_tokens"] += r.get("prompt_tokens", 0)
        g["completion_tokens"] += r.get("completion_tokens", 0)
        g["cached_prompt_tokens"] += r.get("cached_tokens", 0)
    # Money adds up exactly in pico-USD integers; the USD figures are derived from them.
    for k in ("cost_pico_usd", "saved_pico_usd", "fanout_prompt_tokens", "wasted_prompt_tokens",
              "wasted_completion_tokens", "wasted_cost_pico_usd", "prefix_saved_pico_usd"):
        g[k] += r.get(k, 0)
    g["cost_usd"] = g["cost_pico_usd"] / 10**12
    g["saved_usd"] = g["saved_pico_usd"] / 10**12


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



def export_command(config_path: str, fmt: str, out_path: str, start: str | None, end: str | None,
                   tenant: str | None) -> int:
    """`gateway ledger-export`: read the ledger of the config's Redis and write it out."""
    import asyncio
    import sys

    from gateway.config import ConfigError, load_config
    from gateway.store import RedisStore

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    r = cfg.features.redis
    if not r.url:
        print("gateway ledger-export: the config names no redis.url (the in-process ledger lives only inside "
              "a running gateway; use GET /v1/usage)", file=sys.stderr)
        return 2

    def on_error(op: str, e: BaseException) -> None:
        print(f"redis {op} failed: {e}", file=sys.stderr)

    async def run() -> int:
        store = RedisStore(r.url or "", r.key_prefix, max(r.timeout_s, 5.0), 0.0, r.ledger_stream, None, on_error)
        ledger = Ledger(store, 1, 1.0, lambda n: None, lambda n: None)
        try:
            if out_path == "-":
                return await ledger.export(sys.stdout, fmt, parse_time(start), parse_time(end), tenant)
            with open(out_path, "w", newline="") as f:
                return await ledger.export(f, fmt, parse_time(start), parse_time(end), tenant)
        finally:
            await store.close()

    try:
        n = asyncio.run(run())
    except StoreUnavailable:
        return 1
    print(f"{n} records", file=sys.stderr)
    return 0

"""The embedded ledger (no Redis): records and usage aggregates in one local SQLite file (WAL), bounded on disk.

Every `--workers` process opens the same file; SQLite's locking makes their writes one after another,
and WAL lets readers (`/v1/usage`, `gateway ledger-export`) run beside a writer. A batch is one
transaction: its records and its aggregate upserts commit together or not at all. All SQLite calls run
on one thread per process (never on the event loop). Bounds: the oldest records beyond `max_rows` or
older than `max_age_days` are deleted every few minutes, aggregates after `usage_days`; freed pages are
reused (incremental auto-vacuum gives some back to the file system).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway import usage
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway.ledger_sqlite")

T = TypeVar("T")
TRIM_EVERY_S = 300.0
_COLS = ", ".join(usage.COUNTERS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, line BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS usage (tenant TEXT NOT NULL, day INTEGER NOT NULL, hour INTEGER NOT NULL,
  model TEXT NOT NULL, {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in usage.COUNTERS)},
  PRIMARY KEY (tenant, day, hour, model)) WITHOUT ROWID;
"""
_UPSERT = (f"INSERT INTO usage (tenant, day, hour, model, {_COLS}) "
           f"VALUES (?, ?, ?, ?, {', '.join('?' for _ in usage.COUNTERS)}) "
           f"ON CONFLICT (tenant, day, hour, model) DO UPDATE SET "
           + ", ".join(f"{c} = {c} + excluded.{c}" for c in usage.COUNTERS))


class SqliteLedger:
    name = "sqlite"

    def __init__(self, path: str, max_rows: int, max_age_days: float, usage_days: int) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_age_s = max_age_days * 86400
        self.usage_days = usage_days
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ledger-sqlite")
        self._db: sqlite3.Connection | None = None
        self._next_trim = 0.0

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"ledger file {self.path}: {type(e).__name__}: {e}") from None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a power loss may lose the last commits
            db.execute("PRAGMA journal_size_limit = 67108864")  # the WAL file shrinks back to 64 MB
            db.executescript(_SCHEMA)  # IF NOT EXISTS: workers starting together wait on each other
            self._db = db
        return self._db

    async def start(self) -> None:
        await self._call(self._conn)
        log.info("ledger: SQLite file %s", self.path)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._call(shut)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------ write

    def _write(self, entries: Sequence[bytes], groups: usage.Groups) -> None:
        db = self._conn()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO ledger (ts, line) VALUES (?, ?)", [(now, e) for e in entries])
            db.executemany(_UPSERT, [(t, day, hour, model, *(g.get(c, 0) for c in usage.COUNTERS))
                                     for (t, day, hour, model), g in groups.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if now >= self._next_trim:
            self._next_trim = now + TRIM_EVERY_S
            self._trim(db, now)

    def _trim(self, db: sqlite3.Connection, now: float) -> None:
        """Keep the file bounded: rows beyond max_rows or older than max_age, aggregates after usage_days."""
        db.execute("BEGIN IMMEDIATE")
        try:
            top = db.execute("SELECT max(id) FROM ledger").fetchone()[0] or 0
            db.execute("DELETE FROM ledger WHERE id <= ?", (top - self.max_rows,))
            db.execute("DELETE FROM ledger WHERE ts < ?", (now - self.max_age_s,))
            db.execute("DELETE FROM usage WHERE day < ?", (usage.day_hour(now - self.usage_days * 86400)[0],))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA incremental_vacuum(4096)")  # give back up to 16 MB of freed pages per trim
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and empty the WAL (skipped while a reader holds it)

    async def ledger_write(self, writer: str, seq: int, entries: Sequence[bytes], groups: usage.Groups) -> None:
        # One process, one transaction: it committed or it raised; no lost reply to re-send.
        await self._call(self._write, entries, groups)

    async def trim(self) -> None:
        """Apply the bounds now (tests, and the first write after start-up)."""
        await self._call(lambda: self._trim(self._conn(), time.time()))

    # ------------------------------------------------------------------------------------------- read

    def _read(self, after: int, earliest: float, count: int) -> list[tuple[int, bytes]]:
        rows = self._conn().execute("SELECT id, line FROM ledger WHERE id > ? AND ts >= ? ORDER BY id LIMIT ?",
                                    (after, earliest, count)).fetchall()
        return [(i, bytes(line)) for i, line in rows]

    async def ledger_read(self, cursor: str | None, start_ts: float | None,
                          count: int) -> tuple[list[bytes], str | None]:
        earliest = -1.0 if start_ts is None else start_ts - 6 * 3600
        rows = await self._call(self._read, int(cursor) if cursor else 0, earliest, count)
        nxt = str(rows[-1][0]) if len(rows) >= count else None
        return [line for _, line in rows], nxt

    def _usage(self, tenant: str | None, lo_day: int, hi_day: int) -> list[tuple[Any, ...]]:
        q = f"SELECT tenant, day, hour, model, {_COLS} FROM usage WHERE day >= ? AND day <= ?"
        args: list[Any] = [lo_day, hi_day]
        if tenant is not None:
            q += " AND tenant = ?"
            args.append(tenant)
        return self._conn().execute(q, args).fetchall()

    async def usage_groups(self, tenant: str | None, lo_hour: int | None, hi_hour: int | None) -> usage.Groups:
        lo_day = 0 if lo_hour is None else usage.day_hour(lo_hour * 3600)[0]
        hi_day = 99991231 if hi_hour is None else usage.day_hour(hi_hour * 3600)[0]
        rows = await self._call(self._usage, tenant, lo_day, hi_day)
        out: usage.Groups = {}
        for t, day, hour, model, *vals in rows:
            if usage.in_range(day, hour, lo_hour, hi_hour):
                out[(t, day, hour, model)] = dict(zip(usage.COUNTERS, vals, strict=True))
        return out

    def disk_bytes(self) -> int:
        """The file and its WAL, as they stand (for tests and the benchmark)."""
        p = Path(self.path)
        return sum(f.stat().st_size for f in (p, Path(self.path + "-wal")) if f.exists())

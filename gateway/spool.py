"""The spool: ledger batches and limit settles that could not reach Redis, kept in a local SQLite file until they do.

While Redis is away a replica's finished records and budget charges would otherwise live only in its
memory, and a SIGKILL (OOM kill, node loss) or a restart would lose them. They go to this file as soon
as a Redis write fails (and a response's last bytes wait for that, see gateway/ledger_gate.py), and are
replayed, oldest first, when Redis answers again or when a gateway starts with the same file.

Exactly once: a ledger batch keeps the (writer, sequence) it was numbered with, and Redis applies a
writer's batches at most once (USAGE_LUA, LEDGER_LUA in gateway/store.py), so a crash between the Redis
write and the delete here re-sends a batch that changes nothing. A writer whose batch was spooled is
never used for live writes again (gateway/ledger.py rotates it), so a writer's batches always reach
Redis in order. A settle is idempotent through its admission's marker, kept as a tombstone for
SETTLE_REPLAY_MS once a settle was retried. One replayer at a time per file (an flock): `--workers`
processes share the file.

One file per replica (`ledger.spool_path`, default $GATEWAY_STATE_DIR/spool.sqlite3), WAL, synchronous
FULL (a commit survives a power cut, not only a killed process: the spool is written only during an
outage, so the fsync costs nothing in normal operation). Bounded by `ledger.spool_max_bytes`: beyond
it writes are refused and the records stay in memory (where a full buffer drops and counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("gateway.spool")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY AUTOINCREMENT, writer TEXT NOT NULL, seq INTEGER NOT NULL,
  n INTEGER NOT NULL, bytes INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (writer, seq));
CREATE TABLE IF NOT EXISTS settles (lease TEXT PRIMARY KEY, bytes INTEGER NOT NULL, body BLOB NOT NULL);
"""


class SpoolError(Exception):
    """The spool could not take the write (file unwritable, disk full, or `spool_max_bytes` reached)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "full" or "io"


def spool_path(configured: str | None) -> str | None:
    """ledger.spool_path; unset: spool.sqlite3 in $GATEWAY_STATE_DIR (~/.cache/vllm-gateway); "off": none."""
    if configured == "off":
        return None
    if configured:
        return configured
    state = os.environ.get("GATEWAY_STATE_DIR") or str(Path.home() / ".cache" / "vllm-gateway")
    return str(Path(state) / "spool.sqlite3")


class Spool:
    def __init__(self, path: str, max_bytes: int, on_error: Callable[[str], None] | None = None,
                 on_counts: Callable[[int, int], None] | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._on_error = on_error or (lambda reason: None)
        self._on_counts = on_counts or (lambda records, settles: None)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        # The file's content as this process last saw it (other workers may add to it meanwhile).
        self.records = 0
        self.batches = 0
        self.settles = 0
        self.bytes = 0
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- plumbing

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _count(self, db: sqlite3.Connection) -> None:
        b, n, bb = db.execute("SELECT count(*), coalesce(sum(n), 0), coalesce(sum(bytes), 0) FROM batches").fetchone()
        s, sb = db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM settles").fetchone()
        self.batches, self.records, self.settles, self.bytes = b, n, s, bb + sb

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        def run() -> T:
            db = self._conn()
            try:
                return fn(db, *args)
            finally:
                self._count(db)

        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except SpoolError as e:
            self._error(e.reason, str(e))
            raise
        except (sqlite3.Error, OSError) as e:
            self._error("io", f"{type(e).__name__}: {e}")
            raise SpoolError(f"spool {self.path}: {type(e).__name__}: {e}", "io") from None
        self._on_counts(self.records, self.settles)
        return out

    def _error(self, reason: str, what: str) -> None:
        self._on_error(reason)
        loop = asyncio.get_running_loop()
        if loop.time() - self._logged.get(reason, -60.0) >= 10.0:  # an outage must not flood the log
            self._logged[reason] = loop.time()
            log.error("spool %s refused a write (%s): what Redis did not take stays in memory only: %s",
                      self.path, reason, what)

    @staticmethod
    def _tx(db: sqlite3.Connection, work: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            out = work()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    async def start(self) -> None:
        try:
            await self._call(lambda db: None)
        except SpoolError:
            return  # counted and logged; each later write tries again
        if self.records or self.settles:
            log.warning("spool %s holds %d ledger records and %d limit settles from before: replaying them when "
                        "Redis answers", self.path, self.records, self.settles)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------------- ledger

    async def put_batches(self, batches: Sequence[tuple[str, int, Sequence[bytes]]]) -> int:
        """Store (writer, seq, lines) batches in order, as many whole ones as fit; how many were stored."""
        def put(db: sqlite3.Connection) -> int:
            room = self.max_bytes - self.bytes
            rows = []
            for writer, seq, lines in batches:
                body = b"\n".join(lines)  # a record's JSON line never holds a raw newline
                if len(body) > room:
                    break
                room -= len(body)
                rows.append((writer, seq, len(lines), len(body), body))
            if rows:
                # OR IGNORE: a batch already here (the same writer and sequence) is the same batch
                self._tx(db, lambda: db.executemany(
                    "INSERT OR IGNORE INTO batches (writer, seq, n, bytes, body) VALUES (?, ?, ?, ?, ?)", rows))
            return len(rows)

        stored = await self._call(put)
        if stored < len(batches):
            self._error("full", f"spool_max_bytes {self.max_bytes} reached")
        return stored

    async def read_batches(self, after: int, count: int) -> list[tuple[int, str, int, list[bytes]]]:
        """Up to `count` batches with id > after, oldest first: (id, writer, seq, lines)."""
        def read(db: sqlite3.Connection) -> list[tuple[int, str, int, list[bytes]]]:
            rows = db.execute("SELECT id, writer, seq, body FROM batches WHERE id > ? ORDER BY id LIMIT ?",
                              (after, count)).fetchall()
            return [(i, w, s, bytes(body).split(b"\n")) for i, w, s, body in rows]

        return await self._call(read)

    async def delete_batch(self, batch_id: int) -> None:
        await self._call(lambda db: self._tx(db, lambda: db.execute("DELETE FROM batches WHERE id = ?",
                                                                      (batch_id,))))

    # ------------------------------------------------------------------------------------- settles

    async def put_settles(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store (lease, settle) pairs, all or none."""
        def put(db: sqlite3.Connection) -> None:
            size = sum(len(body) for _, body in items)
            if self.bytes + size > self.max_bytes:
                raise SpoolError(f"spool_max_bytes {self.max_bytes} reached", "full")
            self._tx(db, lambda: db.executemany("INSERT OR REPLACE INTO settles (lease, bytes, body) VALUES (?, ?, ?)",
                                                [(lease, len(body), body) for lease, body in items]))

        await self._call(put)

    async def delete_settles(self, leases: Sequence[str]) -> None:
        await self._call(lambda db: self._tx(db, lambda: db.executemany("DELETE FROM settles WHERE lease = ?",
                                                                          [(lease,) for lease in leases])))

    async def read_settles(self) -> list[tuple[str, bytes]]:
        return await self._call(lambda db: [(lease, bytes(body)) for lease, body in
                                            db.execute("SELECT lease, body FROM settles ORDER BY rowid")])

    # ------------------------------------------------------------------------------------- replay

    @contextlib.contextmanager
    def replayer(self) -> Iterator[bool]:
        """Whether this process may replay now (an flock on the file's side: one replayer per file)."""
        try:
            fd = os.open(self.path + ".replay-lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False  # another worker is replaying this file
                return
            yield True
        finally:
            os.close(fd)  # releases the lock


"""Ledger before the last byte: a response ends only once its ledger record is in the shared store.

The ledger buffers finished records and writes them in batches (gateway/ledger.py). A replica that
dies (SIGKILL, OOM kill, node loss) between answering a client and that write would lose the record
of a request the client saw finish. The gate closes that window: before the final bytes of a
response, `wait()` drains the ledger's buffer into the store. Requests finishing together share one
write (group commit: one drain covers every record appended before it ends), so the cost is one Redis
round trip of latency per response, not one write per request.

While the store fails, waiting would only add its timeout to every response: the gate then lets
responses go at once for `skip_s` (the records stay buffered and the ledger's own loop retries); that
window, and the buffer of a replica killed during it, is what an outage can still lose.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.ledger import Ledger
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway.ledger")


class LedgerGate:
    def __init__(self, ledger: Ledger, max_wait_s: float, skip_s: float) -> None:
        self.ledger = ledger
        self.max_wait_s = max_wait_s
        self.skip_s = skip_s
        self._skip_until = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._started = 0  # drains started so far

    async def wait(self) -> None:
        """Return once every record appended so far is written, the store failed, or max_wait_s passed."""
        if not len(self.ledger) or time.monotonic() < self._skip_until:  # buffered or in the batch being written
            return
        mine = self._started  # a drain started before this call may have taken its batch without our record
        try:
            async with asyncio.timeout(self.max_wait_s):
                while len(self.ledger) and time.monotonic() >= self._skip_until:
                    if self._drain is None or self._drain.done():
                        self._started += 1
                        self._drain = asyncio.ensure_future(self._drain_buffer())
                    number, drain = self._started, self._drain
                    # shield: a client that leaves must not cancel the write other responses wait for
                    await asyncio.shield(drain)
                    if number > mine:
                        return
        except TimeoutError:
            self._skip(f"ledger write took longer than {self.max_wait_s:g} s")

    async def _drain_buffer(self) -> None:
        try:
            await self.ledger.flush()  # drains until empty: records appended meanwhile are included
        except StoreUnavailable as e:
            self._skip(str(e))

    def _skip(self, why: str) -> None:
        if time.monotonic() >= self._skip_until:
            log.warning("responses go out before their ledger record is stored for %.1f s: %s", self.skip_s, why)
        self._skip_until = time.monotonic() + self.skip_s

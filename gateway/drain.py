"""Graceful drain: on SIGTERM a replica first says it is going (/readyz 503), then stops.

uvicorn closes its listening socket the moment it gets SIGTERM, so a load balancer learns of the stop
only from refused connections, and a request it had already chosen this replica for can race the
close. With `server.drain_notice_s` > 0 the gateway puts its own SIGTERM handler in front of
uvicorn's: the first SIGTERM starts the notice (/readyz answers 503, responses carry
`connection: close` so clients' kept-alive connections move elsewhere, everything is still served),
and when the notice is over it hands the signal to uvicorn, which stops accepting and lets running
requests finish for up to `server.shutdown_grace_s`. A second SIGTERM skips the rest of the notice.
Without a notice (the default) SIGTERM goes straight to uvicorn, as before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger("gateway.drain")


class Drain:
    """This worker's drain state; `install()` from the running event loop (the app's lifespan)."""

    def __init__(self, notice_s: float) -> None:
        self.notice_s = notice_s
        self.since: float | None = None  # monotonic time the drain began
        self._prev: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    def install(self) -> None:
        # Signal handlers can only be set from the main thread (in-process test clients run elsewhere).
        if self.notice_s <= 0 or threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        self._prev = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)

    def uninstall(self) -> None:
        if self._loop is not None and signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, self._prev)
        if self._timer is not None:
            self._timer.cancel()
        self._loop = None

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if self.since is not None or loop is None:  # a second SIGTERM: stop now
            self._hand_over()
            return
        self.since = time.monotonic()
        # A signal handler may interrupt the loop anywhere: schedule through the thread-safe entry.
        loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        assert self._loop is not None
        log.warning("SIGTERM: draining; /readyz answers 503 for %.1f s, then the listener closes and running "
                    "requests get server.shutdown_grace_s to finish", self.notice_s)
        self._timer = self._loop.call_later(self.notice_s, self._hand_over)

    def _hand_over(self) -> None:
        """Give SIGTERM to the handler that was there before (uvicorn's: stop accepting, drain, exit)."""
        if signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, self._prev)
        signal.raise_signal(signal.SIGTERM)

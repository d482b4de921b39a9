"""One coarse timer for many short deadlines: cancels the tasks that overstay (the request body read).

asyncio.timeout() arms and cancels a timer per use (a few microseconds with uvloop); reading a request
body happens on every request and nearly always finishes at once, so instead each read registers its
task in a dict (~0.1 us) and one timer, running only while reads are registered, checks them every
`tick` seconds. A deadline is thus enforced within [timeout, timeout + tick].
"""

from __future__ import annotations

import asyncio
from typing import Any


class Watchdog:
    """Cancels a watched task once its deadline has passed; `done` tells whether it was this watchdog."""

    def __init__(self, timeout: float, tick: float | None = None) -> None:
        self.timeout = timeout
        self.tick = tick if tick is not None else min(0.5, timeout / 4)
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, task: asyncio.Task[Any]) -> None:
        loop = task.get_loop()
        self._deadlines[task] = loop.time() + self.timeout
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._check, loop)

    def done(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching `task`; True if its deadline passed and it was cancelled (un-cancel it, then)."""
        self._deadlines.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                # The task is suspended at its watched await, so the cancellation surfaces right there.
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self.tick, self._check, loop) if self._deadlines else None

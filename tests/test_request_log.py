"""The request log: whole lines, one write per event-loop turn, never more than PIPE_BUF per write."""

from __future__ import annotations

import asyncio
import io
import select

from gateway.finalize import RequestLog


class Recorder(io.BytesIO):
    """A file that remembers each write, as the pipe or file behind the log would receive it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.flushes = 0

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(b))
        return super().write(b)

    def flush(self) -> None:
        self.flushes += 1


def _log(out: Recorder) -> RequestLog:
    log = RequestLog("off")
    log._out = out  # the file it writes to, observed
    return log


def test_lines_of_one_loop_turn_go_out_together_and_whole() -> None:
    out = Recorder()
    log = _log(out)
    lines = [(b'{"request_id":"%d","pad":"' % i) + b"x" * 900 + b'"}' for i in range(40)]

    async def serve() -> None:
        for line in lines:
            log.write(line)
        assert out.writes == []  # nothing yet: the write waits for the end of this turn of the loop
        await asyncio.sleep(0)

    asyncio.run(serve())
    assert out.getvalue() == b"".join(line + b"\n" for line in lines)
    assert 1 < len(out.writes) < len(lines)  # fewer writes than lines, and split...
    for w in out.writes:  # ...only between lines, within what a pipe writes atomically
        assert w.endswith(b"\n") and len(w) <= select.PIPE_BUF
    assert out.flushes == len(out.writes)


def test_a_line_longer_than_pipe_buf_is_written_alone_and_outside_a_loop_at_once() -> None:
    out = Recorder()
    log = _log(out)
    big = b"y" * (select.PIPE_BUF + 10)
    log.write(b"small")  # no running loop: written through
    assert out.writes == [b"small\n"]

    async def serve() -> None:
        log.write(b"a")
        log.write(big)
        log.write(b"b")
        await asyncio.sleep(0)

    asyncio.run(serve())
    assert out.writes[1:] == [b"a\n", big + b"\n", b"b\n"]


def test_close_writes_what_is_pending() -> None:
    out = Recorder()
    log = _log(out)

    async def serve() -> None:
        log.write(b"last")
        log.close()

    asyncio.run(serve())
    assert out.writes == [b"last\n"] and out.closed

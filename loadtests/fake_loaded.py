"""A test upstream that saturates like a vLLM server: `--capacity` requests run at once, the rest queue.

Queued requests wait for a slot (their time to first token grows with the queue) and are reported as
vllm:num_requests_waiting on /metrics, which the gateway's `overload` rule reads. Everything else is
gateway/testing/fake_vllm.py (the same /control switches).

    python -m loadtests.fake_loaded --port 8101 --model big-base --capacity 4 --ttft-ms 40 --itl-ms 8
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from gateway.testing.fake_vllm import Behaviour, FakeVLLM


class SaturatingFake(FakeVLLM):
    def __init__(self, models: list[str], behaviour: Behaviour, capacity: int) -> None:
        super().__init__(models, behaviour)
        self.slots = asyncio.Semaphore(capacity) if capacity > 0 else None
        self.waiting = 0

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if self.slots is None:
            return await super().generate(request)
        self.waiting += 1
        self.b.num_waiting = float(self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.b.num_waiting = float(self.waiting)
        try:
            return await super().generate(request)
        finally:
            self.slots.release()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--capacity", type=int, default=0, help="requests served at once (0: unlimited)")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=16)
    a = p.parse_args()
    if a.host not in ("127.0.0.1", "localhost"):
        p.error("load-test upstreams listen on 127.0.0.1 only")

    async def make() -> web.Application:
        fake = SaturatingFake(a.model, Behaviour(ttft_ms=a.ttft_ms, itl_ms=a.itl_ms, default_tokens=a.tokens),
                              a.capacity)
        return fake.app()

    web.run_app(make(), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

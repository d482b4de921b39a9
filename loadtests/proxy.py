"""A tiny round-robin TCP proxy on 127.0.0.1: one address in front of several gateway replicas.

Each accepted connection goes to the next backend in turn (like a Kubernetes Service with kube-proxy);
keep-alive connections stay on their replica.

    python -m loadtests.proxy --port 8000 --backend 127.0.0.1:8001 --backend 127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(RuntimeError):
            writer.close()


async def serve(port: int, backends: list[tuple[str, int]]) -> None:
    turn = itertools.cycle(backends)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        for _ in range(len(backends)):  # skip a replica that refuses connections
            host, bport = next(turn)
            try:
                up_r, up_w = await asyncio.open_connection(host, bport)
                break
            except OSError:
                continue
        else:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", action="append", required=True, help="host:port, given once per replica")
    a = ap.parse_args()
    backends = [(h, int(p)) for h, _, p in (b.rpartition(":") for b in a.backend)]
    if any(h not in ("127.0.0.1", "localhost") for h, _ in backends):
        ap.error("backends must be on 127.0.0.1")
    asyncio.run(serve(a.port, backends))


if __name__ == "__main__":
    main()

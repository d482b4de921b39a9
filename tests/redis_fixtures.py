"""Redis for the tests: a real redis-server on a free port (or the one named by GATEWAY_TEST_REDIS_URL)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import free_port


@dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes] | None = None  # None: an external server the tests must not stop
    data_dir: str | None = None  # set: append-only file with fsync per write, so data survives a kill
    extra_args: tuple[str, ...] = ()  # more redis-server options (e.g. --enable-debug-command local)

    def start(self) -> None:
        durability = ["--appendonly", "no"] if self.data_dir is None else [
            "--dir", self.data_dir, "--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability,
             "--daemonize", "no", "--loglevel", "warning", *self.extra_args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        assert self.proc is not None, "cannot kill an external redis"
        self.proc.kill()
        self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


def start_redis(data_dir: str | None = None, extra_args: tuple[str, ...] = ()) -> RedisServer:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, data_dir=data_dir, extra_args=extra_args)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    url = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if url:
        yield RedisServer(url, 0)
        return
    server = start_redis()
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (durable: append-only, fsync always), which it may kill and restart."""
    server = start_redis(str(tmp_path))
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


@pytest.fixture
def redis_prefix() -> str:
    """Keys of one test apart from every other's, on a shared server."""
    return f"t{uuid.uuid4().hex[:10]}:"


def with_redis(config: dict[str, Any], url: str, prefix: str, **redis_extra: Any) -> dict[str, Any]:
    # a generous command timeout: the tests share a loaded machine (the failure tests set their own)
    extra = {"timeout_s": 2.0, **redis_extra}
    return {**config, "redis": {"url": url, "key_prefix": prefix, "ledger_flush_interval_s": 0.05, **extra}}

"""A real Redis Cluster for the tests: 6 redis-server processes in cluster mode (3 masters, 3 replicas).

Each node runs on a free port with its own temporary directory (nodes.conf, append-only file);
`redis-cli --cluster create ... --cluster-replicas 1` assigns the 16384 slots and the replicas. The
node timeout is 1 s (the default 15 s would make every failover test slow) and
`cluster-require-full-coverage no`, as docs/redis.md recommends: the masters that are up keep serving
their slots while a failed one is being replaced. Every node requires a password (the gateway's URL
carries it to the nodes it discovers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tests.conftest import free_port

NODE_TIMEOUT_MS = 1000
PASSWORD = "cluster-secret"  # requirepass + masterauth on every node: the URL's password must reach every node


@dataclass
class Node:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, password=PASSWORD)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalCluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://:{PASSWORD}@" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def topology(self) -> dict[int, tuple[str, int | None, tuple[int, int] | None]]:
        """port -> (role, master's port for a replica, one slot range of a master), from a live node."""
        out: dict[int, tuple[str, int | None, tuple[int, int] | None]] = {}
        text = self.live()[0].client().execute_command("CLUSTER", "NODES")
        lines = (text.decode() if isinstance(text, bytes) else text).splitlines()
        ids = {ln.split()[0]: int(ln.split()[1].split("@")[0].rsplit(":", 1)[1]) for ln in lines}
        for ln in lines:
            f = ln.split()
            port, flags = ids[f[0]], f[2]
            if "fail" in flags or "noaddr" in flags:
                continue
            if "master" in flags:
                slots = next((s for s in f[8:] if "-" in s and not s.startswith("[")), None)
                rng = (int(slots.split("-")[0]), int(slots.split("-")[1])) if slots else None
                out[port] = ("master", None, rng)
            else:
                out[port] = ("replica", ids.get(f[3]), None)
        return out

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s hash slot now."""
        slot = key_slot(key.encode())
        for n in self.live():
            for start, end, master, *_ in n.client().execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"slot {slot} is not served")

    def replica_of(self, master_port: int) -> int:
        return next(p for p, (role, m, _) in self.topology().items() if role == "replica" and m == master_port)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and every slot is served by a live master."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                states = [n.client().execute_command("CLUSTER", "INFO") for n in self.live()]
                masters = {p for p, (role, _, _) in self.topology().items() if role == "master"}
                live_ports = {n.port for n in self.live()}
                if all(b"cluster_state:ok" in s and b"cluster_slots_ok:16384" in s for s in states) and \
                        masters <= live_ports and len(masters) == 3:
                    return
                last = str([s.split(b"\r\n")[0] for s in states])
            except (redis.RedisError, OSError, StopIteration, IndexError, ValueError) as e:
                last = repr(e)
            time.sleep(0.05)
        raise TimeoutError(f"the cluster did not become healthy: {last}")

    def kill(self, port: int) -> None:
        """SIGKILL one node (no goodbye to the others: they notice after the node timeout)."""
        n = self.node(port)
        assert n.proc is not None
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait()

    def wait_master(self, port: int, timeout: float = 30.0) -> float:
        """Wait until `port` is a master; return the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                role = self.node(port).client().execute_command("ROLE")[0]
                if role == b"master":
                    return time.monotonic() - t0
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"node {port} was not promoted")

    def stop(self) -> None:
        for n in self.nodes:
            if n.alive and n.proc is not None:
                n.proc.kill()
                n.proc.wait()


def start_cluster(base: Path, n_masters: int = 3) -> LocalCluster:
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (apt-get install redis-server redis-tools)")
    cluster = LocalCluster()
    try:
        for _ in range(n_masters * 2):
            port = free_port()
            d = base / f"node-{port}"
            d.mkdir()
            node = Node(port, d)
            node.proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-port", str(free_port()),  # the bus port; port + 10000 may be taken or too high
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "no",
                 "--cluster-replica-validity-factor", "0", "--appendonly", "yes", "--appendfsync", "everysec",
                 "--requirepass", PASSWORD, "--masterauth", PASSWORD, "--save", "", "--daemonize", "no",
                 "--loglevel", "warning", "--logfile", str(d / "redis.log")],
                stdout=subprocess.DEVNULL)
            cluster.nodes.append(node)
        for node in cluster.nodes:
            deadline = time.monotonic() + 10
            while True:
                try:
                    node.client().ping()
                    break
                except (redis.ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis-server on port {node.port} did not start") from None
                    time.sleep(0.02)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60,
                       env={**os.environ, "REDISCLI_AUTH": PASSWORD})
        cluster.wait_healthy()
        # every replica has finished its first sync, so a failover has a replica to promote
        deadline = time.monotonic() + 30
        while not all(cluster.node(p).client().info("replication").get("master_link_status") == "up"
                      for p, (role, _, _) in cluster.topology().items() if role == "replica"):
            if time.monotonic() > deadline:
                raise TimeoutError("the replicas did not sync")
            time.sleep(0.05)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()

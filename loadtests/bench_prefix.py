"""Real vLLM: prefix-cache-aware routing vs least outstanding requests over two engines, side by side in one run.

Two local CPU chat engines of the same model with prefix caching on (the shared one, default :8101, and a
second one this script starts on --port-b with deploy/local/engines.py, unless --url-b names a running one)
sit behind one gateway that serves them as two models: `lo` (balance: least_outstanding) and `px`
(balance: prefix). The same workload runs against each, one phase after the other, with the phases' texts
drawn from different seeds so neither finds the other's prefixes cached:

- `--apps` applications, each with its own long system prompt (`--sys-tokens`, >= 512 tokens);
- per application `--singles` short one-turn questions and `--convs` multi-turn conversations of `--turns`
  turns whose user turns carry `--user-tokens` tokens of pasted material (a conversation's next turn
  is sent when its answer came back, with that answer in its history);
- `--concurrency` requests in flight, streamed, `--max-tokens` answer tokens each (ignore_eos).

Per phase it prints vLLM's prefix-cache hit rate (deltas of vllm:prefix_cache_hits_total /
_queries_total on both engines; other traffic on a shared engine counts too), the same rate from the
usage of this phase's own responses (prompt_tokens_details.cached_tokens / prompt_tokens), TTFT p50/p99
(client-side, through the gateway), output tokens/s, and how the requests split between the engines.
The distinct prompt tokens of one phase are printed next to one engine's KV cache (vllm:cache_config_info).

With `--kv-blocks N` it starts BOTH engines itself, on --port-a and --port-b (not the shared :8101), each with
a KV cache of N blocks of 128 tokens (vLLM's --num-gpu-blocks-override; no LoRA): small enough that the
applications' prompts overflow one engine's cache but not the fleet's, the regime where the policies differ
(with the default 1 GiB = 364 blocks each engine holds every prefix of a few-minute run, so both hit).
`--engines K` (with --kv-blocks) starts K engines instead of two: how the gain grows with replicas.

    flock /tmp/vllm-engine.lock .venv/bin/python -m loadtests.bench_prefix [--out F] [--url-b URL | --kv-blocks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.routing.live import parse_vllm_metrics
from loadtests.netutil import free_port, wait_http
from loadtests.prompts import _WORDS
from loadtests.run import ROOT

DOMAINS = ("airline bookings", "tax advice", "cloud billing", "medical scheduling", "legal intake", "car insurance",
           "hotel concierge", "retail returns", "bank cards", "telecom plans", "university admissions", "pet care")


def text(rng: random.Random, words: int) -> str:
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(_WORDS))
        if len(sentence) >= rng.randint(8, 16):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def system_prompt(seed: int, app: int, words: int) -> str:
    rng = random.Random(seed * 1000 + app)
    domain = DOMAINS[app % len(DOMAINS)]
    rules = "\n".join(f"Rule {i + 1}: {text(rng, 24)}" for i in range(max(1, words // 26)))
    return f"You are the {domain} assistant of application {seed}-{app}. Follow these rules strictly.\n{rules}"


@dataclass
class Conversation:
    app: int
    messages: list[dict[str, str]]
    turns_left: int


@dataclass
class Phase:
    name: str
    model: str
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    deployments: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    # per balance decision: requests, prompt tokens, cached prompt tokens (where the hits came from)
    by_decision: dict[str, list[int]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    engines: int = 2
    engine_hits: float = 0.0
    engine_queries: float = 0.0


async def one_request(client: httpx.AsyncClient, url: str, phase: Phase, messages: list[dict[str, str]],
                      max_tokens: int) -> str:
    body = {"model": phase.model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.7, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    reply: list[str] = []
    first: float | None = None
    usage: dict[str, Any] | None = None
    async with client.stream("POST", url, content=orjson.dumps(body),
                             headers={"Content-Type": "application/json"}) as r:
        if r.status_code != 200:
            phase.errors += 1
            await r.aread()
            return ""
        phase.deployments[r.headers.get("x-gateway-deployment", "?")] += 1
        decision = r.headers.get("x-gateway-balance", "?")
        phase.decisions[decision] += 1
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    reply.append(piece)
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        phase.errors += 1
        return ""
    phase.ttft.append(first - t0)
    phase.prompt_tokens += usage["prompt_tokens"]
    phase.completion_tokens += usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    phase.cached_tokens += cached
    tally = phase.by_decision.setdefault(decision, [0, 0, 0])
    tally[0] += 1
    tally[1] += usage["prompt_tokens"]
    tally[2] += cached
    return "".join(reply)


def engine_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        got = parse_vllm_metrics(httpx.get(f"{u}/metrics", timeout=10).text)
        hits += got.get("prefix_hits", 0.0)
        queries += got.get("prefix_queries", 0.0)
    return hits, queries


async def run_phase(gw_url: str, phase: Phase, seed: int, a: argparse.Namespace, engines_: list[str]) -> None:
    rng = random.Random(seed)
    prompts = [system_prompt(seed, app, a.sys_words) for app in range(a.apps)]
    queue: asyncio.Queue[tuple[int, Conversation | None]] = asyncio.Queue()
    items: list[tuple[int, Conversation | None]] = [(app, None) for app in range(a.apps) for _ in range(a.singles)]
    items += [(app, Conversation(app, [{"role": "system", "content": prompts[app]}], a.turns))
              for app in range(a.apps) for _ in range(a.convs)]
    rng.shuffle(items)
    for it in items:
        queue.put_nowait(it)
    pending = len(items) + a.apps * a.convs * (a.turns - 1)
    done = asyncio.Event()
    url = gw_url + "/v1/chat/completions"

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal pending
        while not done.is_set():
            try:
                app, conv = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            if conv is None:
                messages = [{"role": "system", "content": prompts[app]},
                            {"role": "user", "content": f"Question: {text(rng, rng.randint(8, 20))}?"}]
                await one_request(client, url, phase, messages, a.max_tokens)
            else:
                conv.messages.append({"role": "user", "content": "Here is the next part of my case. "
                                      + text(rng, a.user_words) + " What should I do?"})
                answer = await one_request(client, url, phase, conv.messages, a.max_tokens)
                conv.messages.append({"role": "assistant", "content": answer or "(no answer)"})
                conv.turns_left -= 1
                if conv.turns_left > 0:
                    queue.put_nowait((app, conv))  # to the back: users take their turns in rotation
            pending -= 1
            if pending <= 0:
                done.set()

    h0, q0 = engine_counters(engines_)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(worker(client) for _ in range(a.concurrency)))
    phase.elapsed_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # vLLM updates its counters as requests finish; let the last ones land
    h1, q1 = engine_counters(engines_)
    phase.engine_hits, phase.engine_queries = h1 - h0, q1 - q0


def summary(p: Phase) -> dict[str, Any]:
    ttft = sorted(p.ttft)
    split = sorted(p.deployments.values(), reverse=True)
    return {
        "phase": p.name, "requests": sum(p.deployments.values()), "errors": p.errors,
        "vllm_prefix_hit_rate": p.engine_hits / p.engine_queries if p.engine_queries else None,
        "usage_cached_share": p.cached_tokens / p.prompt_tokens if p.prompt_tokens else None,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.90 * len(ttft)))] if ttft else None,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "output_tok_s": p.completion_tokens / p.elapsed_s if p.elapsed_s else None,
        "elapsed_s": p.elapsed_s, "prompt_tokens": p.prompt_tokens, "cached_tokens": p.cached_tokens,
        "requests_by_deployment": dict(p.deployments),
        # the busiest engine's requests over the least busy one's (with 2 engines: the busier over the other)
        "busier_over_other": split[0] / split[-1] if len(split) == p.engines and split[-1] else float("inf"),
        "decisions": dict(p.decisions),
        "cached_share_by_decision": {d: {"requests": n, "cached_share": round(c / t, 3) if t else None}
                                     for d, (n, t, c) in sorted(p.by_decision.items())},
    }


def gateway_config(tmp: Path, urls: list[str], scrape_s: float,
                   prefix_routing: dict[str, Any] | None = None) -> Path:
    def model(prefix: str, balance: str) -> dict[str, Any]:
        extra = {"prefix_routing": prefix_routing} if prefix_routing and balance == "prefix" else {}
        return extra | {"prices": {"prompt_per_1m": 0.1, "cached_prompt_per_1m": 0.025, "completion_per_1m": 0.2},
                "balance": balance,
                "deployments": [{"name": f"{prefix}-{'abcdefgh'[i]}", "url": u, "model": "smollm2",
                                 "timeouts": {"connect": 2, "first_token": 300, "total": 600}}
                                for i, u in enumerate(urls)]}
    cfg = {"server": {"request_log": str(tmp / "requests.jsonl")}, "metrics_scrape_interval": scrape_s,
           "cache": {"mode": "off"},
           "models": {"lo": model("lo", "least_outstanding"), "px": model("px", "prefix")}}
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(cfg))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url-a", help="the first engine, already running (default: the shared http://127.0.0.1:8101)")
    ap.add_argument("--url-b", help="a second engine already running (default: start one on --port-b)")
    ap.add_argument("--port-b", type=int, default=8103)
    ap.add_argument("--kv-blocks", type=int, help="start both engines (on --port-a and --port-b) with a KV cache "
                    "of this many 128-token blocks each, instead of using --url-a / --url-b")
    ap.add_argument("--port-a", type=int, default=8104, help="the first engine's port with --kv-blocks")
    ap.add_argument("--engines", type=int, default=2, help="with --kv-blocks: how many engines to start (the issue's "
                    "acceptance is 2; more shows how the gain scales with replicas)")
    ap.add_argument("--apps", type=int, default=8)
    ap.add_argument("--sys-words", type=int, default=600, help="words per system prompt (~1.2 tokens a word)")
    ap.add_argument("--singles", type=int, default=10, help="one-turn questions per application")
    ap.add_argument("--convs", type=int, default=3, help="conversations per application")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-words", type=int, default=150, help="words of material per conversation turn")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--order", default="lo,px", help="phase order, e.g. px,lo")
    ap.add_argument("--rate-factor", type=float, help="px's prefix_routing.rate_factor (default: the gateway's); "
                    "a diagnostic: how much of px's traffic the traffic-share bound moves")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.kv_blocks is not None and (a.url_a or a.url_b):
        ap.error("--kv-blocks starts both engines: no --url-a / --url-b")
    if a.engines < 2 or (a.engines != 2 and a.kv_blocks is None):
        ap.error("--engines N (N >= 2) needs --kv-blocks (the bench starts the engines itself)")
    from deploy.local import engines

    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the engines this run started are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started: list[subprocess.Popen[bytes]] = []
    gateway = None
    try:
        if a.kv_blocks is not None:
            engines.ensure_ready(verbose=False)
            t0 = time.time()
            ports = [a.port_a, a.port_b] + [free_port() for _ in range(a.engines - 2)]
            for port in ports:
                if engines.is_healthy(f"http://127.0.0.1:{port}"):
                    raise SystemExit(f"port {port} already serves an engine: pick free --port-a / --port-b")
                started.append(engines.start_chat_engine(port, lora=False, kv_blocks=a.kv_blocks))
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            for u, proc in zip(urls, started, strict=True):
                engines.wait_healthy(u, timeout=900, proc=proc)
            print(f"{len(ports)} engines ({a.kv_blocks} KV blocks each) healthy after {time.time() - t0:.0f} s",
                  flush=True)
        else:
            url_a, url_b = a.url_a or "http://127.0.0.1:8101", a.url_b
            if url_b is None:
                engines.ensure_ready(verbose=False)
                started.append(engines.start_chat_engine(a.port_b))
                url_b = f"http://127.0.0.1:{a.port_b}"
                waited = engines.wait_healthy(url_b, timeout=900, proc=started[0])
                print(f"second engine healthy after {waited:.0f} s", flush=True)
            urls = [url_a, url_b]
        for u in urls:
            if not engines.is_healthy(u):
                raise SystemExit(f"engine {u} is not healthy")
        metrics_text = [httpx.get(f"{u}/metrics", timeout=10).text for u in urls]
        caps = [parse_vllm_metrics(t).get("kv_capacity_tokens") for t in metrics_text]
        block = int(m.group(1)) if (m := re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"',
                                                  metrics_text[0])) else 128
        sample = [{"role": "system", "content": system_prompt(0, 0, a.sys_words)}, {"role": "user", "content": "Hi?"}]
        sys_tokens = httpx.post(f"{urls[0]}/tokenize", json={"model": "smollm2", "messages": sample},
                                timeout=30).json()["count"]
        turn_tokens = int(sys_tokens / a.sys_words * a.user_words) + a.max_tokens + 20
        distinct = a.apps * sys_tokens + a.apps * a.convs * a.turns * turn_tokens
        print(f"system prompt ~{sys_tokens} tokens; longest conversation prompt ~{sys_tokens + a.turns * turn_tokens}"
              f" tokens; distinct prompt tokens per phase ~{distinct}; KV cache per engine {caps} tokens", flush=True)
        # vLLM caches whole blocks only: what the applications' requests can share, in blocks
        sys_blocks = a.apps * (sys_tokens // block)
        conv_blocks = a.apps * a.convs * ((a.turns * turn_tokens) // block)
        cap_blocks = [int(c // block) if c else None for c in caps]
        print(f"working set: system prompts {a.apps} x {sys_tokens // block} = {sys_blocks} blocks of {block} tokens"
              f" (+ conversations' history, up to {conv_blocks} at their last turns); one engine's KV cache"
              f" {cap_blocks} blocks: all system prompts = {sys_blocks / max(1, cap_blocks[0] or 1):.2f}x of it,"
              f" half of them = {sys_blocks / 2 / max(1, cap_blocks[0] or 1):.2f}x", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
        port = free_port()
        px_routing = {"rate_factor": a.rate_factor} if a.rate_factor else None
        config = gateway_config(tmp, urls, 1.0, px_routing)
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                                    "--port", str(port), "--log-level", "warning"], cwd=ROOT)
        gw_url = f"http://127.0.0.1:{port}"
        wait_http(f"{gw_url}/healthz", timeout=180, proc=gateway)  # a busy shared machine starts slowly
        phases = []
        for i, name in enumerate(a.order.split(",")):
            p = Phase(name, name, engines=len(urls))
            seed = int(time.time()) * 10 + i  # fresh texts: no phase finds another's (or an earlier run's) prefixes
            asyncio.run(run_phase(gw_url, p, seed, a, urls))
            s = summary(p)
            phases.append(s)
            print(json.dumps(s), flush=True)
        by = {s["phase"]: s for s in phases}
        if "lo" in by and "px" in by:
            lo, px = by["lo"], by["px"]
            lo_hit, px_hit = lo["vllm_prefix_hit_rate"], px["vllm_prefix_hit_rate"]
            print(f"\nhit rate (vLLM counters): lo {lo_hit:.1%} -> px {px_hit:.1%} "
                  f"({px_hit / max(1e-9, lo_hit):.2f}x, target >= 2x)")
            print(f"cached share of prompt tokens (usage): lo {lo['usage_cached_share']:.1%} -> "
                  f"px {px['usage_cached_share']:.1%}")
            print(f"TTFT p50: lo {lo['ttft_p50_s']:.3f} s -> px {px['ttft_p50_s']:.3f} s; "
                  f"p90: lo {lo['ttft_p90_s']:.3f} s -> px {px['ttft_p90_s']:.3f} s; "
                  f"p99: lo {lo['ttft_p99_s']:.3f} s -> px {px['ttft_p99_s']:.3f} s")
            print(f"output tok/s: lo {lo['output_tok_s']:.1f} -> px {px['output_tok_s']:.1f}")
            print(f"busiest engine / least busy (requests): lo {lo['busier_over_other']:.2f}, "
                  f"px {px['busier_over_other']:.2f} (target < 1.3)")
        if a.out:
            a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "kv_capacity_tokens": caps,
                                         "block_size": block, "urls": urls,
                                         "sys_tokens": sys_tokens, "distinct_tokens": distinct,
                                         "phases": phases}, indent=2))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait()
        for proc in started:
            engines.stop(proc)


if __name__ == "__main__":
    main()

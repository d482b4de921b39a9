"""Automatic task routing against the real engines: always-LLM vs declared tasks vs `task_auto`, side by side.

    python -m loadtests.task_routing [--chat-url URL --embed-url URL] [--threshold 0.8] [--deadline-ms 50]

Engines: VLLM_CHAT_URL / VLLM_EMBED_URL (or the flags) name running engines (SmolLM2 + the LoRA adapter
`sentiment`, MiniLM); without them the CPU engines of deploy/local/engines.py are started and stopped.
A gateway (a subprocess, response cache off) fronts them: `smollm2` (the LLM), `sentiment` (the adapter),
`minilm` (embeddings) at deploy/local/gateway.yaml's prices, and the route `assistant` whose `task_auto` uses
deploy/local/data/task_examples/sentiment.jsonl. The labelled test mix loadtests/data/task_mix.jsonl (never
used as examples: deploy/local/data/make_task_data.py) is sent, one request at a time, greedy:

  always-LLM   "model": "smollm2" for every request
  declared     "model": "assistant", every request names its task (`x-gateway-task: sentiment` or `chat`)
  auto         "model": "assistant", nothing declared: task_auto decides
  adapter      "model": "sentiment" for every request (only to price the threshold sweep, below)

Printed per mode: routing precision/recall of the sentiment task, end-task accuracy (the answer's label on
the sentiment requests), cost per request (routing included), p50/p95 of the time the decision added
(`routing_ms`), errors. The threshold sweep reuses auto's confidences: at threshold t a request would be
served by the adapter if its confidence >= t, else by the LLM, and its answer and cost are the ones that
model gave it above (greedy decoding: the same model gives the same answer). Then an outage: the embedding
endpoint (a TCP relay in front of MiniLM) is stopped mid-run; every request must still be answered.
Writes docs/img/task-routing-threshold.png (matplotlib) and docs/task-routing-result.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.netutil import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
MIX = ROOT / "loadtests" / "data" / "task_mix.jsonl"
EXAMPLES = ROOT / "deploy" / "local" / "data" / "task_examples" / "sentiment.jsonl"
PLOT = ROOT / "docs" / "img" / "task-routing-threshold.png"
RESULT = ROOT / "docs" / "task-routing-result.json"
MODES = ("always-LLM", "declared", "auto", "adapter")
THRESHOLDS = [round(i * 0.05, 2) for i in range(21)]


def gateway_config(chat_url: str, embed_url: str, log_path: Path, threshold: float, deadline_ms: float,
                   tokenizer: str | None) -> dict[str, Any]:
    tok = {"tokenizer": tokenizer} if tokenizer else {}
    timeouts = {"connect": 2, "first_token": 60, "total": 300}
    return {
        "server": {"request_log": str(log_path)},
        "cache": {"mode": "off"},  # the modes send the same bodies: every answer must come from an engine
        "models": {
            "smollm2": {"tier": "small", "prices": {"prompt_per_1m": 0.05, "completion_per_1m": 0.10}, **tok,
                        "deployments": [{"name": "smollm2-local", "url": chat_url, "model": "smollm2",
                                         "timeouts": timeouts}]},
            "sentiment": {"tier": "adapter", "prices": {"prompt_per_1m": 0.02, "completion_per_1m": 0.04}, **tok,
                          "deployments": [{"name": "sentiment-local", "url": chat_url, "model": "sentiment",
                                           "timeouts": timeouts}]},
            "minilm": {"tier": "small", "prices": {"prompt_per_1m": 0.01},
                       "deployments": [{"name": "minilm-local", "url": embed_url, "model": "minilm",
                                        "timeouts": {"connect": 1, "first_token": 10, "total": 30}}]},
        },
        "routes": {"assistant": {
            "candidates": ["smollm2", "sentiment"], "tasks": {"sentiment": "sentiment", "classification": "sentiment"},
            "task_auto": {"embedding": "minilm", "examples": {"sentiment": str(EXAMPLES)}, "threshold": threshold,
                          "deadline_ms": deadline_ms}}},
    }


class Gateway:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = workdir / f"gateway-{self.port}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        env = {**os.environ, "GATEWAY_STATE_DIR": str(workdir / f"state-{self.port}")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port",
                                      str(self.port), "--workers", "1", "--log-level", "warning"], cwd=ROOT, env=env)
        wait_http(f"{self.url}/healthz", timeout=60, proc=self.proc)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def wait_classifier(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("gateway_task_classifier_ready", route="assistant") == 1:
                return
            time.sleep(0.5)
        raise TimeoutError("the task classifier was not fitted (is the embedding engine up?)")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def answer_label(text: str) -> str:
    t = text.lower()
    pos, neg = "positive" in t, "negative" in t
    return "positive" if pos and not neg else "negative" if neg and not pos else "other"


def direct_embed_ms(client: httpx.Client, embed_url: str, text: str) -> float:
    """The same embedding call straight to the engine: the floor under what task_auto adds."""
    t0 = time.perf_counter()
    client.post(f"{embed_url}/v1/embeddings", json={"model": "minilm", "input": [text[:1000]]}).raise_for_status()
    return (time.perf_counter() - t0) * 1e3


def request(client: httpx.Client, gw_url: str, row: dict[str, Any], mode: str) -> dict[str, Any]:
    model = {"always-LLM": "smollm2", "adapter": "sentiment"}.get(mode, "assistant")
    # declared: a perfect client names every request's task (a generation task keeps the LLM, unclassified)
    headers = {"x-gateway-task": row["task"] or "chat"} if mode == "declared" else {}
    body = {"model": model, "messages": [{"role": "user", "content": row["text"]}],
            "max_tokens": row["max_tokens"], "temperature": 0}
    t0 = time.perf_counter()
    r = client.post(f"{gw_url}/v1/chat/completions", json=body, headers=headers)
    e2e = time.perf_counter() - t0
    h = r.headers
    out: dict[str, Any] = {"mode": mode, "kind": row["kind"], "task": row["task"], "label": row["label"],
                           "status": r.status_code, "e2e_s": e2e, "served": h.get("x-gateway-model"),
                           "decision": h.get("x-gateway-task-decision"),
                           "confidence": float(h["x-gateway-task-confidence"]) if "x-gateway-task-confidence" in h
                           else None,
                           "routing_ms": float(h.get("x-gateway-routing-ms", 0.0)),
                           "routing_cost_usd": float(h.get("x-gateway-routing-cost-usd", 0.0)),
                           "cost_usd": float(h.get("x-gateway-cost-usd", 0.0))}
    if r.status_code == 200:
        text = r.json()["choices"][0]["message"]["content"] or ""
        out["answer"] = answer_label(text)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    sent = [r for r in rows if r["task"] == "sentiment"]
    to_adapter = [r for r in rows if r["served"] == "sentiment"]
    tp = sum(1 for r in to_adapter if r["task"] == "sentiment")
    correct = sum(1 for r in sent if r.get("answer") == r["label"])
    routing = [r["routing_ms"] for r in rows if r["decision"] not in (None, "declared")]
    return {"requests": len(rows), "errors": sum(1 for r in rows if r["status"] != 200),
            "recall": tp / len(sent) if sent else 0.0, "precision": tp / len(to_adapter) if to_adapter else None,
            "routed_share": len(to_adapter) / len(rows), "accuracy": correct / len(sent) if sent else 0.0,
            "cost_per_request_usd": sum(r["cost_usd"] for r in rows) / len(rows),
            "routing_cost_per_request_usd": sum(r["routing_cost_usd"] for r in rows) / len(rows),
            "routing_ms_p50": pct(routing, 0.5), "routing_ms_p95": pct(routing, 0.95),
            "direct_embed_ms_p50": pct([r["direct_embed_ms"] for r in rows if "direct_embed_ms" in r], 0.5),
            "direct_embed_ms_p95": pct([r["direct_embed_ms"] for r in rows if "direct_embed_ms" in r], 0.95),
            "e2e_s_p50": pct([r["e2e_s"] for r in rows], 0.5),
            "false_positives_by_kind": {k: sum(1 for r in to_adapter if r["kind"] == k)
                                        for k in ("chat", "generation")},
            "decisions": {d: sum(1 for r in rows if str(r["decision"]) == d)
                          for d in sorted({str(r["decision"]) for r in rows})},
            "routing_ms_over_50_share": sum(1 for v in routing if v > 50) / len(routing) if routing else 0.0}


def sweep(by_mode: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Accuracy, cost, precision and recall of `auto` at each threshold, from the answers already measured."""
    llm, adapter, auto = by_mode["always-LLM"], by_mode["adapter"], by_mode["auto"]
    n_sent = sum(1 for r in auto if r["task"] == "sentiment")
    out = []
    for t in THRESHOLDS:
        correct = cost = tp = routed = 0.0
        for a, lr, ad in zip(auto, llm, adapter, strict=True):
            to_adapter = a["confidence"] is not None and a["confidence"] >= t
            served = ad if to_adapter else lr
            cost += served["cost_usd"] + a["routing_cost_usd"]
            routed += to_adapter
            if a["task"] == "sentiment":
                tp += to_adapter
                correct += served.get("answer") == a["label"]
        out.append({"threshold": t, "accuracy": correct / n_sent, "cost_per_request_usd": cost / len(auto),
                    "recall": tp / n_sent, "precision": tp / routed if routed else None})
    return out


def plot(points: list[dict[str, Any]], baseline: dict[str, dict[str, Any]], threshold: float) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[load]'): no plot"
    ts = [p["threshold"] for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(ts, [p["accuracy"] for p in points], "o-", label="auto: end-task accuracy")
    ax1.plot(ts, [p["recall"] for p in points], "s--", label="auto: routing recall")
    ax1.plot(ts, [p["precision"] if p["precision"] is not None else float("nan") for p in points], "^--",
             label="auto: routing precision")
    ax1.axhline(baseline["declared"]["accuracy"], color="g", lw=1, label="declared: accuracy")
    ax1.axhline(baseline["always-LLM"]["accuracy"], color="r", lw=1, label="always-LLM: accuracy")
    ax1.axvline(threshold, color="grey", ls=":", lw=1)
    ax1.set_xlabel("confidence threshold")
    ax1.set_ylim(0, 1.05)
    ax1.legend(fontsize=7, loc="lower left")
    ax1.set_title("Sentiment requests: accuracy and routing")
    ax2.plot(ts, [p["cost_per_request_usd"] * 1e6 for p in points], "o-", label="auto (routing included)")
    ax2.axhline(baseline["always-LLM"]["cost_per_request_usd"] * 1e6, color="r", lw=1, label="always-LLM")
    ax2.axhline(baseline["declared"]["cost_per_request_usd"] * 1e6, color="g", lw=1, label="declared")
    ax2.axvline(threshold, color="grey", ls=":", lw=1)
    ax2.set_xlabel("confidence threshold")
    ax2.set_ylabel("USD per 1M requests")
    ax2.legend(fontsize=7)
    ax2.set_title("Cost per request, whole mix")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    return f"wrote {PLOT.relative_to(ROOT)}"


# ------------------------------------------------------------------------------------------ the outage

async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class Relay:
    """A TCP relay in front of the shared embedding engine, so that 'the embedding deployment stops' can be
    done without stopping an engine others use: stopping the relay closes its port (connection refused)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.proc = subprocess.Popen([sys.executable, "-c", f"import asyncio, loadtests.task_routing as t; "
                                      f"asyncio.run(t._relay_main({self.port}, {target_port}))"], cwd=ROOT)
        wait_http(f"http://127.0.0.1:{self.port}/health", timeout=20, proc=self.proc)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def _relay_main(port: int, target_port: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pipe(r, tw), _pipe(tr, w))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def outage(workdir: Path, chat_url: str, embed_url: str, mix: list[dict[str, Any]], args: argparse.Namespace,
           tokenizer: str | None) -> dict[str, Any]:
    relay = Relay(int(embed_url.rsplit(":", 1)[1]))
    gw = Gateway(workdir, gateway_config(chat_url, f"http://127.0.0.1:{relay.port}", workdir / "outage.jsonl",
                                         args.threshold, args.deadline_ms, tokenizer))
    try:
        gw.wait_classifier()
        rows = mix[: args.outage_requests]
        results = []
        with httpx.Client(timeout=120) as client:
            for i, row in enumerate(rows):
                if i == len(rows) // 3:
                    relay.stop()  # the embedding endpoint goes away mid-run
                results.append(request(client, gw.url, row, "auto"))
        after = results[len(rows) // 3:]
        return {"requests": len(results), "errors": sum(1 for r in results if r["status"] != 200),
                "after_stop": len(after),
                "after_stop_decisions": {d: sum(1 for r in after if r["decision"] == d)
                                         for d in sorted({str(r["decision"]) for r in after})},
                "after_stop_served": {m: sum(1 for r in after if r["served"] == m)
                                      for m in sorted({str(r["served"]) for r in after})},
                "metric_unavailable": gw.metric("gateway_route_decisions_total", route="assistant", rule="task_auto",
                                                outcome="unavailable"),
                "routing_ms_p95_after_stop": pct([r["routing_ms"] for r in after], 0.95)}
    finally:
        gw.stop()
        if relay.proc.poll() is None:
            relay.stop()


# ------------------------------------------------------------------------------------------ main

def engines_urls(args: argparse.Namespace) -> tuple[str, str, list[Any]]:
    chat, embed = args.chat_url or os.environ.get("VLLM_CHAT_URL"), args.embed_url or os.environ.get("VLLM_EMBED_URL")
    started: list[Any] = []
    from deploy.local import engines

    if not (chat and engines.is_healthy(chat)):
        engines.ensure_ready()
        port = free_port()
        started.append(engines.start_chat_engine(port))
        chat = f"http://127.0.0.1:{port}"
        engines.wait_healthy(chat, timeout=900, proc=started[-1])
    if not (embed and engines.is_healthy(embed)):
        port = free_port()
        started.append(engines.start_embedding_engine(port))
        embed = f"http://127.0.0.1:{port}"
        engines.wait_healthy(embed, timeout=900, proc=started[-1])
    return chat, embed, started


def tokenizer_folder() -> str | None:
    try:
        from deploy.local import engines

        return str(engines.manifest()["chat_model"])
    except Exception:  # noqa: BLE001 - without it the gateway bounds prompts by their bytes
        return None


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    cols = [c for c in ("always-LLM", "declared", "auto") if c in summary]
    rows = [("requests", "requests", "{:d}"), ("errors", "errors", "{:d}"),
            ("routed to adapter (share)", "routed_share", "{:.3f}"),
            ("sentiment routing recall", "recall", "{:.3f}"), ("sentiment routing precision", "precision", "{:.3f}"),
            ("end-task accuracy (sentiment)", "accuracy", "{:.3f}"),
            ("cost per request (USD)", "cost_per_request_usd", "{:.3e}"),
            ("  of which routing (USD)", "routing_cost_per_request_usd", "{:.3e}"),
            ("added latency p50 (ms)", "routing_ms_p50", "{:.2f}"),
            ("added latency p95 (ms)", "routing_ms_p95", "{:.2f}"),
            ("  engine's own embed call p50 (ms)", "direct_embed_ms_p50", "{:.2f}"),
            ("  engine's own embed call p95 (ms)", "direct_embed_ms_p95", "{:.2f}"),
            ("end-to-end p50 (s)", "e2e_s_p50", "{:.3f}")]
    print(f"{'':36}" + "".join(f"{c:>14}" for c in cols))
    for title, key, fmt in rows:
        cells = []
        for c in cols:
            v = summary[c][key]
            cells.append(f"{'-' if v is None else fmt.format(v):>14}")
        print(f"{title:36}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chat-url")
    p.add_argument("--embed-url")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--deadline-ms", type=float, default=250.0,
                   help="task_auto's deadline for the embedding call (a miss: the default route, counted)")
    p.add_argument("--limit", type=int, default=0, help="only the first N requests of the mix")
    p.add_argument("--outage-requests", type=int, default=45)
    p.add_argument("--no-write", action="store_true", help="print only (no plot, no result file)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="a subset prints its table only (no sweep, outage, plot or file)")
    args = p.parse_args(argv)
    mix = [json.loads(line) for line in MIX.read_text().splitlines() if line.strip()]
    if args.limit:
        mix = mix[: args.limit]
    chat, embed, started = engines_urls(args)
    tokenizer = tokenizer_folder()
    workdir = Path(tempfile.mkdtemp(prefix="task-routing-"))
    try:
        gw = Gateway(workdir, gateway_config(chat, embed, workdir / "requests.jsonl", args.threshold,
                                             args.deadline_ms, tokenizer))
        try:
            t0 = time.perf_counter()
            gw.wait_classifier()
            print(f"classifier fitted on {sum(1 for _ in EXAMPLES.open())} examples in "
                  f"{time.perf_counter() - t0:.1f}s; mix: {len(mix)} requests", flush=True)
            by_mode: dict[str, list[dict[str, Any]]] = {}
            with httpx.Client(timeout=120) as client:
                for row in mix[:5]:  # warm-up (connections, engine caches), not counted
                    request(client, gw.url, row, "auto")
                for mode in args.modes:
                    t1 = time.perf_counter()
                    by_mode[mode] = []
                    for row in mix:
                        res = request(client, gw.url, row, mode)
                        if mode == "auto":  # the engine's own time for the same call, just after
                            res["direct_embed_ms"] = direct_embed_ms(client, embed, row["text"])
                        by_mode[mode].append(res)
                    print(f"  {mode}: {len(mix)} requests in {time.perf_counter() - t1:.0f}s", flush=True)
        finally:
            gw.stop()
        summary = {m: summarise(rows) for m, rows in by_mode.items()}
        print()
        print_table(summary)
        if set(by_mode) != set(MODES):
            return 0  # a subset of the modes: no sweep, no outage, nothing written
        points = sweep(by_mode)
        print("\nthreshold sweep (auto; answers and costs as measured per model):")
        print(f"{'threshold':>10}{'recall':>9}{'precision':>11}{'accuracy':>10}{'USD/request':>14}")
        for pt in points:
            prec = "-" if pt["precision"] is None else f"{pt['precision']:.3f}"
            print(f"{pt['threshold']:>10.2f}{pt['recall']:>9.3f}{prec:>11}{pt['accuracy']:>10.3f}"
                  f"{pt['cost_per_request_usd']:>14.3e}")
        out = outage(workdir, chat, embed, mix, args, tokenizer)
        print(f"\noutage (embedding endpoint stopped after {out['requests'] - out['after_stop']} of "
              f"{out['requests']} requests): errors {out['errors']}, decisions after the stop "
              f"{out['after_stop_decisions']}, served {out['after_stop_served']}, "
              f"gateway_route_decisions_total{{outcome=\"unavailable\"}} = {out['metric_unavailable']:g}, "
              f"routing_ms p95 after the stop {out['routing_ms_p95_after_stop']:.2f}")
        if not args.no_write:
            print(plot(points, summary, args.threshold))
            RESULT.write_text(json.dumps({"threshold": args.threshold, "deadline_ms": args.deadline_ms,
                                          "mix": str(MIX.relative_to(ROOT)), "summary": summary, "sweep": points,
                                          "outage": out}, indent=2) + "\n")
            print(f"wrote {RESULT.relative_to(ROOT)}")
    finally:
        from deploy.local import engines

        for proc in started:
            engines.stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

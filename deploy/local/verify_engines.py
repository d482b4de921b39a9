#!/usr/bin/env python3
"""Smoke-check running local vLLM engines over HTTP (stdlib only).

    python deploy/local/verify_engines.py [--chat-url http://127.0.0.1:8101] [--embed-url http://127.0.0.1:8102]

Checks: /v1/models (smollm2 + LoRA "sentiment" with parent smollm2; minilm), chat completion
non-stream and stream with stream_options.include_usage, /v1/completions, the sentiment adapter on
held-out examples, /v1/embeddings (384 dims), /metrics token counters. Exit code 0 if all pass.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = ("Classify the sentiment of this review as positive or negative. "
          "Answer with one word: positive or negative.\n\nReview: {text}")


def _req(url: str, body: dict | None = None, timeout: float = 120) -> urllib.request.addinfourl:
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(r, timeout=timeout)


def get_json(url: str, body: dict | None = None) -> dict:
    with _req(url, body) as r:
        return json.loads(r.read())


def verify(chat_url: str, embed_url: str | None, n_sentiment: int = 40) -> dict:
    res: dict = {}
    ok = True

    def check(name: str, cond: bool, detail="") -> None:
        nonlocal ok
        ok &= bool(cond)
        res[name] = {"ok": bool(cond), "detail": detail}
        print(f"  [{'PASS' if cond else 'FAIL'}] {name}: {detail}", flush=True)

    models = get_json(f"{chat_url}/v1/models")["data"]
    ids = {m["id"]: m for m in models}
    check("models", "smollm2" in ids and "sentiment" in ids and ids["sentiment"].get("parent") == "smollm2",
          {k: v.get("parent") for k, v in ids.items()})

    t = time.time()
    r = get_json(f"{chat_url}/v1/chat/completions", {
        "model": "smollm2", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    check("chat", "Paris" in r["choices"][0]["message"]["content"] and r["usage"]["completion_tokens"] > 0,
          f"{r['choices'][0]['message']['content']!r} usage={r['usage']} {time.time() - t:.2f}s")

    chunks, done, text = [], False, ""
    t = time.time()
    ttft = None
    with _req(f"{chat_url}/v1/chat/completions", {
            "model": "smollm2", "max_tokens": 32, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Name three colours."}]}) as s:
        for line in s:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                break
            c = json.loads(payload)
            chunks.append(c)
            for ch in c.get("choices", []):
                piece = ch.get("delta", {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.time() - t
                text += piece
    last = chunks[-1] if chunks else {}
    check("chat_stream_usage", done and last.get("choices") == [] and last.get("usage", {}).get("total_tokens", 0) > 0,
          f"{len(chunks)} chunks, text={text!r}, final usage={last.get('usage')}, ttft={ttft and round(ttft, 3)}s, "
          f"total={time.time() - t:.2f}s")

    r = get_json(f"{chat_url}/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                                "max_tokens": 8, "temperature": 0})
    check("completions", bool(r["choices"][0]["text"].strip()) and r["usage"]["prompt_tokens"] > 0,
          f"{r['choices'][0]['text']!r} usage={r['usage']}")

    rows = [json.loads(x) for x in (HERE / "data" / "sentiment.jsonl").read_text().splitlines() if x.strip()]
    rows = [x for x in rows if x["split"] == "heldout"][:n_sentiment]
    correct = {"sentiment": 0, "smollm2": 0}
    t = time.time()
    for row in rows:
        for model in correct:
            a = get_json(f"{chat_url}/v1/chat/completions", {
                "model": model, "max_tokens": 3, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPT.format(text=row["text"])}]})
            ans = a["choices"][0]["message"]["content"].strip().lower()
            correct[model] += ans.startswith(row["label"])
    acc = {m: round(c / len(rows), 3) for m, c in correct.items()}
    check("sentiment_adapter", acc["sentiment"] >= 0.8 and acc["sentiment"] > acc["smollm2"],
          f"served accuracy on {len(rows)} held-out: adapter {acc['sentiment']} vs base {acc['smollm2']} "
          f"({time.time() - t:.1f}s)")
    res["served_sentiment_accuracy"] = acc

    if embed_url:
        r = get_json(f"{embed_url}/v1/embeddings", {"model": "minilm", "input": ["hello world", "bonjour"]})
        dims = [len(d["embedding"]) for d in r["data"]]
        check("embeddings", dims == [384, 384], f"dims={dims} usage={r.get('usage')}")
        emodels = [m["id"] for m in get_json(f"{embed_url}/v1/models")["data"]]
        check("embed_models", emodels == ["minilm"], emodels)

    with _req(f"{chat_url}/metrics") as m:
        metrics = m.read().decode()
    want = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running",
            "vllm:time_to_first_token_seconds"]
    lines = [ln for ln in metrics.splitlines() if ln.split("{")[0] in ("vllm:prompt_tokens_total",
                                                                        "vllm:generation_tokens_total")]
    check("metrics", all(w in metrics for w in want), lines)
    res["ok"] = ok
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chat-url", default="http://127.0.0.1:8101")
    ap.add_argument("--embed-url", default="http://127.0.0.1:8102")
    ap.add_argument("--no-embed", action="store_true")
    ap.add_argument("--n-sentiment", type=int, default=40)
    a = ap.parse_args()
    res = verify(a.chat_url, None if a.no_embed else a.embed_url, a.n_sentiment)
    print("ALL PASS" if res["ok"] else "SOME CHECKS FAILED")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

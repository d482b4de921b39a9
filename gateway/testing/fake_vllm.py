"""A test upstream that speaks vLLM's OpenAI protocol, fast, with switches for delays and faults.

It is a real HTTP server (aiohttp) used by the tests and the benchmarks. Token counts are
deterministic (one token per whitespace-separated word) and exported like vLLM's own counters on
/metrics, so accounting can be checked against it the same way as against real vLLM.

Run: python -m gateway.testing.fake_vllm --port 8101 --model smollm2 --model sentiment
Change behaviour at run time: POST /control {"ttft_ms": 50, "fail_status": 503, ...}; GET /control.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.testing.fake_apis import FakeApis


@dataclass
class Behaviour:
    ttft_ms: float = 0.0  # delay before the first token (streams) or before the answer
    itl_ms: float = 0.0  # delay between tokens
    default_tokens: int = 16
    fail_status: int = 0  # answer every request with this HTTP status (0: don't)
    die_after_chunks: int = -1  # close the connection after this many token chunks (-1: don't)
    malformed_after_chunks: int = -1  # send a chunk that is not JSON after this many (-1: don't)
    omit_usage: bool = False  # answer without usage
    absurd_usage: bool = False  # report impossible token counts
    stall_after_chunks: int = -1  # stop sending (but keep the connection) after this many token chunks
    error_event_after_chunks: int = -1  # send a vLLM-style error event mid-stream
    num_waiting: float = 0.0  # reported as vllm:num_requests_waiting
    kv_cache_usage: float = 0.0  # reported as vllm:kv_cache_usage_perc
    # reported as vllm:prefix_cache_hits_total / _queries_total when set (a restart: set them lower)
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    cached_tokens: int = 0  # report this many prompt tokens (at most all) as prompt_tokens_details.cached_tokens
    healthy: bool = True
    # runtime LoRA (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): /v1/load_lora_adapter, /v1/unload_lora_adapter
    load_ms: float = 0.0  # how long a load takes
    unload_ms: float = 0.0  # how long an unload takes
    load_fail_status: int = 0  # answer loads with this status (0: don't)
    max_loras: int = 0  # refuse a load beyond this many adapters, as a server with full slots would (0: never;
    # vLLM 0.32 itself never refuses: it evicts from its own CPU cache)


@dataclass
class Counters:
    prompt_tokens: int = 0  # like vLLM: every choice's prefill, counted when it produces its first output
    generation_tokens: int = 0
    requests: int = 0
    lora_loads: int = 0
    lora_unloads: int = 0
    running: int = 0
    busy_s: float = 0.0  # time with at least one request running (what a GPU-time cost basis pays for)
    busy_since: float = 0.0
    last_request: dict[str, Any] = field(default_factory=dict)
    last_traceparent: str | None = None  # the W3C trace context the last generate request carried

    def start(self) -> None:
        if self.running == 0:
            self.busy_since = time.perf_counter()
        self.running += 1

    def stop(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.busy_s += time.perf_counter() - self.busy_since


def prompt_counts(body: dict[str, Any]) -> list[int]:
    """Tokens of each prompt of a request (a completions request may carry a list of prompts)."""
    if "messages" in body:
        return [count_prompt_tokens(body)]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return [len(p) if isinstance(p, list) else len(str(p).split()) + 1 for p in prompt]
    return [count_prompt_tokens(body)]


def count_prompt_tokens(body: dict[str, Any]) -> int:
    if isinstance(body.get("messages"), list):
        n = 2
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            n += 4 + len(str(content or "").split())
        return n
    prompt = body.get("prompt", body.get("input", ""))
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        return sum(len(p) if isinstance(p, list) else len(str(p).split()) + 1 for p in prompt)
    return len(str(prompt).split()) + 1


EMBED_DIMS = 64


def text_vector(text: str) -> list[float]:
    """A deterministic unit embedding that depends on the text: its words hashed into signed buckets (texts
    sharing words are close), so a classifier over embeddings (routing/task_auto.py) learns from it."""
    v = [0.0] * EMBED_DIMS
    for w in re.findall(r"[a-z0-9']+", text.lower()):
        h = zlib.crc32(w.encode())
        v[h % EMBED_DIMS] += 1.0 if (h >> 16) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


class FakeVLLM:
    def __init__(self, models: list[str], behaviour: Behaviour | None = None, max_model_len: int = 2048) -> None:
        self.models = models
        self.b = behaviour or Behaviour()
        self.c = Counters()
        self.max_model_len = max_model_len
        self.loras: dict[str, str] = {}  # adapters loaded at run time: name -> path
        self.lora_running: dict[str, int] = {}  # requests in flight per adapter (never broken by an unload)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.post("/v1/chat/completions", self.generate),
            web.post("/v1/completions", self.generate),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/tokenize", self.tokenize),
            web.post("/v1/load_lora_adapter", self.load_lora),
            web.post("/v1/unload_lora_adapter", self.unload_lora),
            web.get("/v1/models", self.list_models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
            web.get("/control", self.get_control),
            web.post("/control", self.set_control),
            *FakeApis(self).routes(),  # /v1/responses (+ its store), /v1/messages, /detokenize
        ])
        return app

    # ------------------------------------------------------------------ control
    async def get_control(self, request: web.Request) -> web.Response:
        return _json({"behaviour": asdict(self.b), "counters": asdict(self.c), "loras": self.loras,
                      "lora_running": self.lora_running})

    async def set_control(self, request: web.Request) -> web.Response:
        changes = orjson.loads(await request.read())
        if changes.pop("reset_counters", False):
            self.c = Counters()
        if changes.pop("restart", False):  # what an engine restart loses: every adapter loaded at run time
            self.loras.clear()
        self.b = Behaviour(**{**asdict(self.b), **changes})
        return _json(asdict(self.b))

    # ------------------------------------------------------------------ vLLM endpoints
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.b.healthy else 503)

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m,
                 "parent": None if i == 0 else self.models[0], "max_model_len": self.max_model_len}
                for i, m in enumerate(self.models)]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "vllm", "root": p, "parent": self.models[0],
                  "max_model_len": None} for n, p in self.loras.items()]
        return _json({"object": "list", "data": data})

    async def load_lora(self, request: web.Request) -> web.Response:
        """vLLM's POST /v1/load_lora_adapter: 200 with a text body; errors as vLLM words them."""
        body = orjson.loads(await request.read())
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name in self.models:
            return _error(f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput", 400)
        if name in self.loras and not body.get("load_inplace"):
            return _error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                          "place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        if self.b.load_ms:
            await asyncio.sleep(self.b.load_ms / 1e3)
        if self.b.load_fail_status:
            return _error(f"injected load failure {self.b.load_fail_status}", "InternalServerError",
                          self.b.load_fail_status)
        if not os.path.isdir(path):
            return _error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        if self.b.max_loras and len(self.loras) >= self.b.max_loras:
            return _error(f"Cannot load lora {name}: the maximum number of LoRA adapters ({self.b.max_loras}) "
                          "is already loaded.", "BadRequestError", 400)
        self.loras[name] = path
        self.c.lora_loads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        name = body.get("lora_name")
        if not name:
            return _error("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400)
        if self.b.unload_ms:
            await asyncio.sleep(self.b.unload_ms / 1e3)
        if name not in self.loras:
            return _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.loras[name]
        self.c.lora_unloads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(self, request: web.Request) -> web.Response:
        name = self.models[0]
        lines = [
            f'vllm:num_requests_running{{model_name="{name}"}} {float(self.c.running)}',
            f'vllm:num_requests_waiting{{model_name="{name}"}} {self.b.num_waiting}',
            f'vllm:kv_cache_usage_perc{{model_name="{name}"}} {self.b.kv_cache_usage}',
            f'vllm:prompt_tokens_total{{model_name="{name}"}} {float(self.c.prompt_tokens)}',
            f'vllm:generation_tokens_total{{model_name="{name}"}} {float(self.c.generation_tokens)}',
        ]
        if self.b.prefix_cache_hits is not None and self.b.prefix_cache_queries is not None:
            lines += ["# TYPE vllm:prefix_cache_hits_total counter",
                      f'vllm:prefix_cache_hits_total{{model_name="{name}"}} {self.b.prefix_cache_hits}',
                      "# TYPE vllm:prefix_cache_queries_total counter",
                      f'vllm:prefix_cache_queries_total{{model_name="{name}"}} {self.b.prefix_cache_queries}']
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def tokenize(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        n = count_prompt_tokens(body)
        return _json({"count": n, "max_model_len": self.max_model_len, "tokens": list(range(n))})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.c.last_request = body
        self.c.last_traceparent = request.headers.get("traceparent")
        if err := self._refuse(body):
            return err
        raw = body["input"]
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        n = count_prompt_tokens(body)
        self.c.requests += 1
        if self.b.ttft_ms:
            await asyncio.sleep(self.b.ttft_ms / 1e3)
        self.c.prompt_tokens += n
        data = [{"object": "embedding", "index": i, "embedding": text_vector(str(x))} for i, x in enumerate(inputs)]
        return _json({"object": "list", "model": body["model"], "data": data,
                      "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _refuse(self, body: dict[str, Any]) -> web.Response | None:
        """Injected failures first, then the checks vLLM itself makes (its answers are 400/404, never 500)."""
        if self.b.fail_status:
            return _json({"error": {"message": f"injected failure {self.b.fail_status}", "type": "InternalError",
                                    "code": self.b.fail_status}}, status=self.b.fail_status)
        if body.get("model") not in self.models and body.get("model") not in self.loras:
            return _json({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                    "type": "NotFoundError", "code": 404}}, status=404)
        try:
            prompt_tokens = count_prompt_tokens(body)
            tokens = body.get("prompt", body.get("input"))
            flat = tokens if isinstance(tokens, list) else []
            flat = [t for x in flat for t in (x if isinstance(x, list) else [x])]
            if any(isinstance(t, int) and not 0 <= t < 50_000 for t in flat) or any(
                    isinstance(t, bool) for t in flat):
                raise ValueError("token ids must be in [0, vocab_size)")
            if body.get("max_tokens") is not None and not isinstance(body["max_tokens"], int):
                raise ValueError("max_tokens must be an integer")
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            return _json({"error": {"message": f"invalid request: {e}", "type": "BadRequestError", "code": 400}},
                         status=400)
        wanted = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        if prompt_tokens + wanted > self.max_model_len:
            return _json({"error": {"message": f"This model's maximum context length is {self.max_model_len} "
                                    f"tokens. However, you requested {prompt_tokens + wanted} tokens "
                                    f"({prompt_tokens} in the messages, {wanted} in the completion).",
                                    "type": "BadRequestError", "code": 400}}, status=400)
        return None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.c.last_request = body
        self.c.last_traceparent = request.headers.get("traceparent")
        if err := self._refuse(body):
            return err
        chat = "messages" in body
        prompts = prompt_counts(body)
        n_choices = int(body.get("n") or 1)
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.b.default_tokens)
        self.c.requests += 1
        self.c.start()
        model = body["model"]
        self.lora_running[model] = self.lora_running.get(model, 0) + 1
        try:
            if body.get("stream"):
                return await self._stream(request, body, chat, prompts, n_choices, n)
            if self.b.ttft_ms:
                await asyncio.sleep(self.b.ttft_ms / 1e3)
            self.c.prompt_tokens += sum(prompts) * n_choices  # one prefill per choice, as vLLM counts
            if self.b.itl_ms:
                await asyncio.sleep(self.b.itl_ms * max(0, n - 1) / 1e3)
            choices_total = len(prompts) * n_choices
            self.c.generation_tokens += n * choices_total
            text = "".join(f"tok{i} " for i in range(n))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            choices: list[dict[str, Any]] = []
            for idx in range(choices_total):
                if chat:
                    choices.append({"index": idx, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "length", "logprobs": None})
                else:
                    choices.append({"index": idx, "text": text, "finish_reason": "length", "logprobs": None})
            out: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                   "created": int(time.time()), "model": body["model"], "choices": choices}
            if self.b.absurd_usage:
                out["usage"] = {"prompt_tokens": -3, "completion_tokens": 10**15, "total_tokens": 0}
            elif not self.b.omit_usage:
                out["usage"] = self._usage(sum(prompts), n * choices_total)
            return _json(out)
        finally:
            self.c.stop()
            self.lora_running[model] -= 1

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}
        if self.b.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": min(self.b.cached_tokens, prompt_tokens)}
        return out

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, prompts: list[int],
                      n_choices: int, n: int) -> web.StreamResponse:
        """vLLM's stream: with continuous usage each chunk carries ITS choice's counts (choice index
        i belongs to prompt i // n); only the final usage chunk has the request's totals."""
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) and not self.b.omit_usage
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body["model"]}
        choices_total = len(prompts) * n_choices

        def usage(idx: int, done: int) -> dict[str, Any]:
            return self._usage(prompts[idx // n_choices], done)

        async def send(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        if self.b.ttft_ms:
            await asyncio.sleep(self.b.ttft_ms / 1e3)
        if request.transport is None or request.transport.is_closing():
            return resp  # the client left during the prefill: vLLM aborts it before any output, counts nothing
        self.c.prompt_tokens += sum(prompts) * n_choices  # prefill done: one per choice, as vLLM counts
        try:
            if chat:
                for idx in range(choices_total):
                    first = {**base, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    if continuous:
                        first["usage"] = usage(idx, 0)
                    await send(first)
            sent = 0
            for i in range(n):
                if i and self.b.itl_ms:
                    await asyncio.sleep(self.b.itl_ms / 1e3)
                for idx in range(choices_total):
                    if await self._fault(sent, request, resp):
                        return resp
                    chunk = _token_chunk(base, chat, idx, i, "length" if i == n - 1 else None)
                    if continuous:
                        chunk["usage"] = usage(idx, i + 1)
                    await send(chunk)
                    self.c.generation_tokens += 1  # counted once written: an ideal engine, no abort gap
                    sent += 1
            if include_usage:
                total = n * choices_total
                await send({**base, "choices": [], "usage": self._usage(sum(prompts), total)})
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the client (the gateway) went away: like vLLM, just stop
        return resp


    async def _fault(self, sent: int, request: web.Request, resp: web.StreamResponse) -> bool:
        """The injected mid-stream fault due after `sent` token chunks, if any; True: the stream is over."""
        if sent == self.b.die_after_chunks:
            assert request.transport is not None
            request.transport.abort()
            return True
        if sent == self.b.stall_after_chunks:
            await asyncio.sleep(3600)
        if sent == self.b.malformed_after_chunks:
            await resp.write(b"data: {not json\n\n")
            return True
        if sent == self.b.error_event_after_chunks:
            await resp.write(b"data: " + orjson.dumps({"error": {"message": "injected engine error",
                                                                  "type": "InternalServerError", "code": 500}})
                             + b"\n\ndata: [DONE]\n\n")
            return True
        return False


def _token_chunk(base: dict[str, Any], chat: bool, idx: int, i: int, finish: str | None) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": idx, "delta": {"content": f"tok{i} "}, "logprobs": None,
                                  "finish_reason": finish}
    else:
        choice = {"index": idx, "text": f"tok{i} ", "logprobs": None, "finish_reason": finish}
    return {**base, "choices": [choice]}


def _error(message: str, err_type: str, status: int) -> web.Response:
    return _json({"error": {"message": message, "type": err_type, "param": None, "code": status}}, status=status)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--model", action="append", help="served model names (first is the base)")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=16, help="completion tokens when max_tokens is not given")
    p.add_argument("--max-model-len", type=int, default=2048)
    a = p.parse_args()
    fake = FakeVLLM(a.model or ["fake-model"], Behaviour(ttft_ms=a.ttft_ms, itl_ms=a.itl_ms,
                                                         default_tokens=a.tokens), a.max_model_len)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(fake.app(), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

"""Prompt tokens: counted with the model's own tokenizer and chat template, or bounded without them.

vLLM renders a chat request through the model's chat template (Jinja2, as transformers'
`apply_chat_template` does) and tokenizes the text without adding special tokens; a completion prompt is
tokenized with them. `Tokenizer` does the same from the files vLLM serves from (`tokenizer.json`, and the
template in `chat_template.jinja` or `tokenizer_config.json`), so its count is vLLM's count for text.

Every endpoint turns its request into chat messages (gateway/apis/contract.py); this module counts them:
- `bound` is what admission reserves: an upper bound. With a tokenizer: the rendered count plus a small
  margin per message (vLLM joins content parts and renders tool calls in ways a template may differ on);
  without one: every UTF-8 byte of the text counts as a token (a byte-level BPE or byte-fallback token
  covers at least one byte) plus a fixed allowance for the template's own text.
- `exact` is what a usage-less ending is billed: the rendered count with no margin, media parts 0 (vLLM
  counts an image's tokens only on a multimodal model; we never bill a guess).
Media parts (images, audio, video, files) have no text to count: the reservation takes
`media_part_tokens` for each (limits.media_part_tokens).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

MEDIA_TYPES = frozenset({"image_url", "input_image", "image", "image_pil", "image_embeds", "input_audio",
                         "audio_url", "audio", "video_url", "video", "file", "input_file", "document"})
TEXT_TYPES = frozenset({"text", "input_text", "output_text", "refusal", "summary_text", "reasoning_text"})
MAX_TOKENS_SANE = 1 << 40  # above any real limit; keeps every figure sent to Redis a valid 64-bit integer
# Without a tokenizer: what a chat template may add around each message and for the whole conversation
# (roles, markers, a default system prompt: SmolLM2's is 31 tokens), in tokens.
TEMPLATE_PER_MESSAGE = 16
TEMPLATE_FIXED = 96
# Pieces of rendered prompts remembered with their counts (LRU): at most ENTRIES x MAX_CHARS characters.
PIECE_CACHE_ENTRIES = 4096
PIECE_CACHE_MAX_CHARS = 4096
# With a tokenizer: slack per message for renderings a template and vLLM may differ on (part joins,
# tool-call layout); the reservation stays an upper bound, the median stays ~1.0x.
MARGIN_PER_MESSAGE = 4
MARGIN_FIXED = 8


@dataclass(slots=True)
class Conversation:
    """A request's prompt as vLLM renders it: chat messages (+ tools), or raw prompt texts (completions)."""

    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    texts: list[str | list[int]] | None = None  # completions / embeddings: each prompt (text or token ids)
    media_parts: int = 0  # image/audio/video/file parts: not text, bounded apart
    extra_json: list[Any] | None = None  # request fields the guided decoder or template may add (schemas)


def json_size(value: Any) -> int:
    """Bytes of `value` as JSON, at least (walked iteratively: no recursion limit, no encoder depth limit)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += utf8_len(v) + 2
        elif isinstance(v, dict):
            total += 2 + len(v)
            for k, x in v.items():
                total += len(str(k)) + 3
                stack.append(x)
        elif isinstance(v, list | tuple):
            total += 2 + len(v)
            stack.extend(v)
        else:
            total += len(str(v))
    return total


def as_json(value: Any) -> str:
    """`value` as JSON text for the template; one nested too deep for an encoder (vLLM refuses it too) is
    stood in for by text of its size, so a bound is still taken."""
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return "0" * json_size(value)


def text_of(content: Any) -> tuple[str, int]:
    """(the text of a message's content as vLLM joins it, the number of media parts in it)."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return as_json(content), 0
    texts: list[str] = []
    media = 0
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            texts.append(as_json(part))
            continue
        kind = part.get("type")
        kind = kind if isinstance(kind, str) else None
        text = part.get("text", part.get(kind)) if kind in TEXT_TYPES else None
        if isinstance(text, str):
            texts.append(text)
        elif kind in MEDIA_TYPES or MEDIA_TYPES.intersection(part):
            media += 1
        else:
            texts.append(as_json(part))
    return "\n".join(texts), media


def utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


class Tokenizer:
    """A model's tokenizer and chat template, loaded once at start-up from the folder vLLM serves from."""

    def __init__(self, path: str) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        self.path = str(folder)
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_file = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: vLLM uses "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise ValueError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")

        def special(name: str) -> str:
            v = cfg.get(name)
            return v.get("content", "") if isinstance(v, dict) else (v or "")

        self.specials = {n: special(n) for n in ("bos_token", "eos_token", "unk_token", "pad_token")}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template)
        # The tokenizer splits text at its special tokens before anything else, so a rendered conversation's
        # count is the sum of its pieces' counts: each piece (a message with its role) is counted once and
        # remembered, so a system prompt or an earlier turn resent with every request costs nothing again.
        specials = sorted((a.content for a in self.tok.get_added_tokens_decoder().values() if a.special),
                          key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._pieces: OrderedDict[str, int] = OrderedDict()

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> str:
        return self.template.render(messages=messages, tools=tools or None, add_generation_prompt=True,
                                    **self.specials)

    def count_text(self, text: str, special_tokens: bool) -> int:
        if special_tokens or self._split is None:
            return len(self.tok.encode(text, add_special_tokens=special_tokens).ids)
        n = 0
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                n += 1  # a special token
            elif piece:
                n += self._piece(piece)
        return n

    def _piece(self, piece: str) -> int:
        n = self._pieces.get(piece)
        if n is not None:
            self._pieces.move_to_end(piece)
            return n
        n = len(self.tok.encode(piece, add_special_tokens=False).ids)
        if len(piece) <= PIECE_CACHE_MAX_CHARS:
            self._pieces[piece] = n
            if len(self._pieces) > PIECE_CACHE_ENTRIES:
                self._pieces.popitem(last=False)
        return n

    def continuation(self, conv: Conversation) -> int:
        """Tokens a continued conversation adds after the stored one's output: the new messages and the
        generation prompt. The stored turn's end marker is left out (vLLM's output count may already hold
        it as the stop token), so this never counts more than vLLM prefills; at most 2 tokens less."""
        head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        full = self.count_text(self.render([*head, *(conv.messages or [])], conv.tools), False)
        closed = self.template.render(messages=head, tools=conv.tools or None, add_generation_prompt=False,
                                      **self.specials)
        return max(0, full - self.count_text(closed, False))

    def count(self, conv: Conversation) -> int:
        """vLLM's prompt tokens for the conversation's text (media parts not included)."""
        n = 0
        if conv.messages is not None:
            n += self.count_text(self.render(conv.messages, conv.tools), False)
        for t in conv.texts or ():
            n += len(t) if isinstance(t, list) else self.count_text(t, True)
        return n


def _bytes_bound(conv: Conversation) -> int:
    """Tokens <= bytes (+ the template's own text): an upper bound that needs no tokenizer."""
    n = 0
    if conv.messages is not None:
        n += TEMPLATE_FIXED
        for m in conv.messages:
            n += TEMPLATE_PER_MESSAGE + sum(utf8_len(v) if isinstance(v, str) else json_size(v)
                                            for k, v in m.items() if k != "role")
        if conv.tools:
            n += json_size(conv.tools)
    for t in conv.texts or ():
        n += len(t) if isinstance(t, list) else 2 + utf8_len(t)
    return n


@dataclass(frozen=True, slots=True)
class PromptCounter:
    """One model's prompt counting: its tokenizer when configured, else the byte bound."""

    tokenizer: Tokenizer | None = None

    def bound(self, conv: Conversation, media_part_tokens: int) -> int:
        """An upper bound on the prompt tokens vLLM will count (what admission reserves)."""
        n = conv.media_parts * media_part_tokens
        if conv.extra_json:
            n += sum(json_size(v) for v in conv.extra_json)
        if self.tokenizer is None:
            return min(n + _bytes_bound(conv), MAX_TOKENS_SANE)
        try:
            counted = self.tokenizer.count(conv)
        except Exception:  # a template that refuses this conversation (vLLM will too): bound it by bytes
            return min(n + _bytes_bound(conv), MAX_TOKENS_SANE)
        margin = MARGIN_FIXED + MARGIN_PER_MESSAGE * (len(conv.messages or ()) + len(conv.texts or ()))
        return min(n + counted + margin, MAX_TOKENS_SANE)

    def exact_continuation(self, conv: Conversation) -> int | None:
        if self.tokenizer is None:
            return None
        try:
            return self.tokenizer.continuation(conv)
        except Exception:
            return None

    def exact(self, conv: Conversation) -> int | None:
        """vLLM's count of the conversation's text, or None without a tokenizer (the caller asks vLLM)."""
        if self.tokenizer is None:
            return None
        try:
            return self.tokenizer.count(conv)
        except Exception:
            return None
BYTE_BOUND = PromptCounter()  # a model without a tokenizer


def load_counters(tokenizers: dict[str, str | None]) -> dict[str, PromptCounter]:
    """model name -> its counter, each tokenizer folder loaded once (an adapter shares its base model's)."""
    loaded: dict[str, PromptCounter] = {}
    out: dict[str, PromptCounter] = {}
    for name, folder in tokenizers.items():
        if folder is None:
            out[name] = BYTE_BOUND
            continue
        if folder not in loaded:
            loaded[folder] = PromptCounter(Tokenizer(folder))
        out[name] = loaded[folder]
    return out

"""One contract per endpoint: every rule that money and safety depend on, stated in one object.

The request path asks the endpoint's contract and never branches on its name: its request schema and
error shape, how its prompt renders as chat messages (what the reservation counts and a usage-less
ending is billed), the body fields that bound its output, how many sequences vLLM generates, how its
usage is read from a body or a stream, whether a stream reports its prompt before the end, what the
cache may key and keep, and whether it stores responses. `CONTRACTS` lists every endpoint the gateway
proxies; tests/test_contract_invariants.py runs every money invariant over each of them, so a new
endpoint is covered the moment it is declared here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gateway import errors
from gateway.apis import messages, responses
from gateway.apis.events import EventAccountant
from gateway.apis.schemas import DetokenizeRequest, MessagesRequest, ResponsesRequest, TokenizeRequest
from gateway.errors import GatewayError
from gateway.prompt_tokens import MEDIA_TYPES, Conversation, as_json, text_of
from gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Endpoint, validate_with
from gateway.streaming import AbsurdUsage, UsageTally, tally_body

# Request fields the guided decoder or the template may turn into prompt tokens, besides the messages:
# bounded by their size in the reservation, never billed.
PROMPT_JSON_FIELDS = ("functions", "tool_choice", "function_call", "response_format", "guided_json",
                      "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "suffix",
                      "chat_template", "chat_template_kwargs", "documents", "text")


def _int_field(body: dict[str, Any], name: str) -> int:
    v = body.get(name)
    if v is None:
        return 1
    if isinstance(v, bool) or not isinstance(v, int):
        raise errors.bad_request(f"'{name}' must be an integer.", param=name)
    if v < 1:
        raise errors.bad_request(f"'{name}' must be at least 1.", param=name)
    return v


def _choices(body: dict[str, Any]) -> int:
    """n (or best_of, if larger): the sequences vLLM generates per prompt."""
    return max(_int_field(body, "n"), _int_field(body, "best_of"))


def _one(body: dict[str, Any]) -> int:
    return 1


def _n(body: dict[str, Any]) -> int:
    """Choices returned per prompt (a stream's choice index i belongs to prompt i // n)."""
    n = body.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def _completion_sequences(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    per_prompt = _choices(body)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return per_prompt * len(prompt)  # a list of strings or of token lists: one completion set each
    return per_prompt


def _extra(body: dict[str, Any], fields: tuple[str, ...] = PROMPT_JSON_FIELDS) -> list[Any]:
    return [body[f] for f in fields if body.get(f) is not None]


def _message(role: Any, content: Any, conv: Conversation, **rest: Any) -> dict[str, Any]:
    text, media = text_of(content)
    conv.media_parts += media
    return {"role": role if isinstance(role, str) else "user", "content": text, **rest}


# ---- how each API's request renders as chat messages (as vLLM converts it before the template)


def chat_conversation(body: dict[str, Any]) -> Conversation:
    conv = Conversation(messages=[], extra_json=_extra(body))
    tools = body.get("tools")
    conv.tools = tools if isinstance(tools, list) else None
    if tools is not None and not isinstance(tools, list):
        conv.extra_json = [*(conv.extra_json or []), tools]
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            conv.messages.append({"role": "user", "content": as_json(m)})  # type: ignore[union-attr]
            continue
        rest = {k: v for k, v in m.items() if k in ("tool_calls", "tool_call_id", "name")}
        conv.messages.append(_message(m.get("role"), m.get("content"), conv, **rest))  # type: ignore[union-attr]
        others = {k: v for k, v in m.items() if k not in ("role", "content", "tool_calls", "tool_call_id", "name")}
        if others:
            conv.extra_json = [*(conv.extra_json or []), others]
    return conv


def _texts(prompt: Any, conv: Conversation) -> None:
    """Completions' prompt / embeddings' input: a string, a list of strings, token ids or lists of them."""
    conv.texts = []
    if isinstance(prompt, str):
        conv.texts.append(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        conv.texts.append(list(prompt))
    elif isinstance(prompt, list):
        for p in prompt:
            conv.texts.append(p if isinstance(p, str | list) else as_json(p))
    elif prompt is not None:
        conv.texts.append(as_json(prompt))


def completion_conversation(body: dict[str, Any]) -> Conversation:
    conv = Conversation(extra_json=_extra(body))
    _texts(body.get("prompt"), conv)
    return conv


def embedding_conversation(body: dict[str, Any]) -> Conversation:
    conv = Conversation()
    _texts(body.get("input"), conv)
    return conv


def _function_tools(tools: Any, conv: Conversation, schema_key: str) -> list[Any] | None:
    """Responses / Anthropic tool definitions in the chat shape the template reads."""
    if not isinstance(tools, list):
        if tools is not None:
            conv.extra_json = [*(conv.extra_json or []), tools]
        return None
    out: list[Any] = []
    for t in tools:
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            out.append({"type": "function", "function": {
                "name": t["name"], "description": t.get("description"), "parameters": t.get(schema_key)}})
        else:  # a built-in tool (web search, ...): its definition bounds what it may add
            conv.extra_json = [*(conv.extra_json or []), t]
    return out or None


def responses_conversation(body: dict[str, Any]) -> Conversation:
    """vLLM's Responses -> chat conversion: instructions as the system message, then every input item."""
    conv = Conversation(messages=[], extra_json=_extra(body))
    msgs: list[dict[str, Any]] = conv.messages  # type: ignore[assignment]
    conv.tools = _function_tools(body.get("tools"), conv, "parameters")
    if isinstance(body.get("instructions"), str):
        msgs.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        msgs.append({"role": "user", "content": items})
        return conv
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            msgs.append({"role": "user", "content": as_json(item)})
            continue
        kind = item.get("type", "message")
        if kind == "message" or (kind not in _RESPONSE_ITEMS and "role" in item):
            msgs.append(_message(item.get("role"), item.get("content"), conv))
        elif kind == "function_call":
            msgs.append({"role": "assistant", "content": "", "tool_calls": [{
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}]})
        elif kind == "function_call_output":
            msgs.append(_message("tool", item.get("output"), conv, tool_call_id=item.get("call_id")))
        elif kind == "reasoning":
            summary = item.get("summary") or item.get("content")
            msgs.append(_message("assistant", summary, conv))
        elif kind in MEDIA_TYPES:
            conv.media_parts += 1
        else:  # an item type vLLM may render some other way: its JSON bounds it
            conv.extra_json = [*(conv.extra_json or []), item]
    return conv


_RESPONSE_ITEMS = frozenset({"message", "function_call", "function_call_output", "reasoning"})


def messages_conversation(body: dict[str, Any]) -> Conversation:
    """vLLM's Anthropic -> chat conversion: the system prompt, then each message's blocks."""
    conv = Conversation(messages=[], extra_json=_extra(body))
    msgs: list[dict[str, Any]] = conv.messages  # type: ignore[assignment]
    conv.tools = _function_tools(body.get("tools"), conv, "input_schema")
    system = body.get("system")
    if system is not None:
        msgs.append(_message("system", system, conv))
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            msgs.append({"role": "user", "content": as_json(m)})
            continue
        content = m.get("content")
        if not isinstance(content, list):
            msgs.append(_message(m.get("role"), content, conv))
            continue
        texts: list[Any] = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_use" and isinstance(block, dict):
                msgs.append({"role": "assistant", "content": "", "tool_calls": [{
                    "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"),
                                 "arguments": as_json(block.get("input"))}}]})
            elif kind == "tool_result" and isinstance(block, dict):
                msgs.append(_message("tool", block.get("content"), conv, tool_call_id=block.get("tool_use_id")))
            else:
                texts.append(block)
        if texts:
            msgs.append(_message(m.get("role"), texts, conv))
    return conv


def no_conversation(body: dict[str, Any]) -> Conversation:
    return Conversation()


# ---- usage of a non-streaming answer


def _tally_chat(body: Any, n: int) -> UsageTally:
    return tally_body(body, n)


def _tally_with(read: Callable[[Any], dict[str, Any] | None]) -> Callable[[Any, int], UsageTally]:
    def tally(body: Any, n: int) -> UsageTally:
        t = UsageTally(1)
        usage = read(body)
        if usage is not None:
            with contextlib.suppress(AbsurdUsage):
                t.add_body(usage)
        return t

    return tally


def _always(body: dict[str, Any]) -> bool:
    return True


def _unstored(body: dict[str, Any]) -> bool:
    return body.get("store") is False  # a stored response has an identity (its id): never hand it to another


def _never(body: dict[str, Any]) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class EndpointContract:
    """What the request path needs to know about one endpoint (see the module docstring)."""

    name: Endpoint
    path: str
    schema: type[BaseModel]
    conversation: Callable[[dict[str, Any]], Conversation]  # the prompt as vLLM renders it
    output_fields: tuple[str, ...]  # body fields bounding the output, vLLM's precedence first; (): no output
    sequences: Callable[[dict[str, Any]], int]  # sequences generated (n x prompts)
    billed: bool  # False: counted as a request, no tokens, no cost (tokenize)
    can_stream: bool
    tally_body: Callable[[Any, int], UsageTally]  # usage of a non-streaming answer
    accountant: type[EventAccountant] | None  # named-event streams; None: chat-shaped chunks
    first_output: Callable[[Any], bool] | None  # named-event streams: ends the hold-back before the first token
    error_body: Callable[[GatewayError], bytes]
    cacheable: Callable[[dict[str, Any]], bool]  # structurally (the tenant's cache mode decides the rest)
    prompt_in_stream: bool  # a stream's events carry the prompt count before its end (else counted at an early end)
    stores_responses: bool = False  # answers are stored by the engine and may be continued
    choices: Callable[[dict[str, Any]], int] = _one  # choices returned per prompt (n)
    stored_lookup: bool = False  # no body: the path names a stored response (GET/cancel), sent to its engine
    method: str = "POST"
    error_schema: type[BaseModel] | None = None  # the error body's shape when it is not OpenAI's

    def streams(self, body: dict[str, Any]) -> bool:
        return self.can_stream and body.get("stream") is True

    def validate(self, body: Any) -> Any:
        return validate_with(self.schema, body)


class NoBody(BaseModel):
    """A request without a body (the path says everything)."""


def _openai_error(err: GatewayError) -> bytes:
    return err.to_json()


_CHAT_OUTPUT = ("max_completion_tokens", "max_tokens")  # vLLM chat: max_completion_tokens wins when both set

CONTRACTS: dict[str, EndpointContract] = {c.name: c for c in (
    EndpointContract("chat", "/v1/chat/completions", ChatCompletionRequest, chat_conversation, _CHAT_OUTPUT,
                     _choices, True, True, _tally_chat, None, None, _openai_error, _always, True, choices=_n),
    EndpointContract("completions", "/v1/completions", CompletionRequest, completion_conversation, ("max_tokens",),
                     _completion_sequences, True, True, _tally_chat, None, None, _openai_error, _always, True,
                     choices=_n),
    EndpointContract("embeddings", "/v1/embeddings", EmbeddingRequest, embedding_conversation, (), _one, True,
                     False, _tally_chat, None, None, _openai_error, _always, True),
    EndpointContract("responses", "/v1/responses", ResponsesRequest, responses_conversation, ("max_output_tokens",),
                     _one, True, True, _tally_with(responses.body_usage), responses.ResponsesAccountant,
                     responses.first_output, _openai_error, _unstored, False, stores_responses=True),
    EndpointContract("messages", "/v1/messages", MessagesRequest, messages_conversation, ("max_tokens",), _one, True,
                     True, _tally_with(messages.body_usage), messages.MessagesAccountant, messages.first_output,
                     messages.error_body, _always, True, error_schema=messages.AnthropicErrorResponse),
    EndpointContract("tokenize", "/tokenize", TokenizeRequest, no_conversation, (), _one, False, False, _tally_chat,
                     None, None, _openai_error, _never, True),
    EndpointContract("detokenize", "/detokenize", DetokenizeRequest, no_conversation, (), _one, False, False,
                     _tally_chat, None, None, _openai_error, _never, True),
    EndpointContract("responses.retrieve", "/v1/responses/{response_id}", NoBody, no_conversation, (), _one, False,
                     False, _tally_chat, None, None, _openai_error, _never, True, stored_lookup=True, method="GET"),
    EndpointContract("responses.cancel", "/v1/responses/{response_id}/cancel", NoBody, no_conversation, (), _one,
                     False, False, _tally_chat, None, None, _openai_error, _never, True, stored_lookup=True),
)}

# The proxied POST routes with a JSON body (the stored-response paths are matched by gateway/apis/retrieve.py).
PATHS: dict[str, Endpoint] = {c.path: c.name for c in CONTRACTS.values() if not c.stored_lookup}


def contract_of(endpoint: str) -> EndpointContract:
    return CONTRACTS[endpoint]


def validate_request(endpoint: str, body: Any) -> Any:
    return CONTRACTS[endpoint].validate(body)

"""OpenAI request bodies decoded once into typed, validated objects, with the bounds the
router enforces and reserves for.

* :func:`decode_body` turns raw bytes into a JSON object safely: invalid UTF-8, malformed JSON,
  numbers out of range and nesting deeper than :data:`MAX_DEPTH` are client faults
  (:class:`BadRequestError`, HTTP 400), never an exception from deep inside the router.
* :func:`parse_request` validates the fields the router reads (wrong types → 400 naming the
  field) into a :class:`CompletionRequest` or :class:`ChatRequest`; every other field travels
  to the engine untouched (``body``).
* **Output bound** — what the engine will generate at most per sequence, read the way vLLM
  reads it: ``/v1/completions`` reads ``max_tokens`` only (``max_completion_tokens`` is not a
  completions field); chat reads ``max_completion_tokens``, else ``max_tokens``. ``null`` is
  the same as absent: ``output_bound`` is then None (the engine's own default applies unless
  the router writes its bound, see :mod:`.upstream`).
* **Sequences** — ``max(n, best_of)``: the engine generates that many sequences, each up to
  the output bound, so reservations multiply the bound by it.
* **Prompt upper bound** — tokens the prompt can cost at most: every prompt of a list (token
  ids exactly, text as UTF-8 bytes — no tokenizer emits more tokens than bytes), plus special
  tokens per prompt; for chat every message's text and other fields, the ``tools`` /
  ``functions`` schemas (their JSON size), :data:`IMAGE_TOKENS` per image, audio or video part,
  and the chat template's framing (:data:`CHAT_TEMPLATE_TOKENS` + :data:`MESSAGE_TOKENS` per
  message).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from kvroute_router.openai.errors import BadRequestError

EndpointKind = Literal["completions", "chat", "other"]

MAX_DEPTH = 64
"""Deepest JSON nesting accepted (tools schemas need a few levels; 10^5 is an attack)."""
MAX_COUNT = 2**31 - 1
"""Largest ``max_tokens`` / ``n`` / ``best_of`` accepted (vLLM's own fields are 32-bit)."""
SPECIAL_TOKENS_PER_PROMPT = 4
"""BOS/EOS and similar tokens a tokenizer may add to one completions prompt."""
CHAT_TEMPLATE_TOKENS = 256
"""The chat template's fixed text (default system prompts, generation prompt), at most."""
MESSAGE_TOKENS = 16
"""The chat template's framing of one message (role markers, separators), at most."""
IMAGE_TOKENS = 4096
"""Tokens allowed for one image, audio or video part. Vision encoders put a few hundred to a
few thousand tokens per image (LLaVA-1.5: 576, Qwen2-VL at 1280x720: ~1200, LLaVA-NeXT: up to
2880); 4096 covers them. It is a reservation, not a limit: the engine's usage settles the
exact cost."""
MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "image_embeds", "input_audio",
                         "audio_url", "video_url"})


def endpoint_kind(path: str) -> EndpointKind:
    """Which OpenAI endpoint a request path names (``other``: passed through unparsed)."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    return "other"


FIELD_SCAN_LIMIT = 4 * 1024 * 1024
"""Bytes of a refused body scanned to name the top-level field at fault."""


def _too_deep(value: Any, depth: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, depth)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = value.values() if type(value) is dict else value
        kinds = set(map(type, children))  # in C: a flat list of token ids is not walked
        if dict in kinds or list in kinds:
            for child in children:
                kind = type(child)
                if kind is dict or kind is list:
                    stack.append((child, depth + 1))
    return False


def _field_at(raw: bytes, offset: int | None) -> str | None:
    """The top-level key whose value holds byte ``offset`` (None: where nesting first goes
    deeper than :data:`MAX_DEPTH`) of a body that failed to decode; None when unknown."""
    depth = 0
    in_string = False
    escaped = False
    key_start = -1
    key: str | None = None
    expect_key = False
    limit = FIELD_SCAN_LIMIT if offset is None else min(offset, FIELD_SCAN_LIMIT)
    for i in range(min(len(raw), limit)):
        c = raw[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
                if key_start >= 0:
                    key = raw[key_start:i].decode("utf-8", "replace")
                    key_start = -1
            continue
        if c == 0x22:
            in_string = True
            if depth == 1 and expect_key:
                key_start = i + 1
                expect_key = False
        elif c in (0x7B, 0x5B):
            depth += 1
            if depth == 1 and c == 0x7B:
                expect_key = True
            if offset is None and depth > MAX_DEPTH:
                return key
        elif c in (0x7D, 0x5D):
            depth -= 1
        elif c == 0x2C and depth == 1:
            expect_key = True
    return key if offset is not None and offset <= FIELD_SCAN_LIMIT else None


def _failing_field(raw: bytes) -> str | None:
    """The first top-level key whose value alone fails to decode (a string that is not UTF-8,
    a number out of range), when the object's outline itself decodes."""
    try:
        fields = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    for key, value in fields.items():
        try:
            msgspec.json.decode(value)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            return key
    return None


_DECODE_AT = re.compile(r"\(byte (\d+)\)|at `\$\.?([A-Za-z_0-9]*)")


def decode_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadRequestError (naming the top-level field at fault when
    it can be found) for anything else."""
    try:
        body = msgspec.json.decode(raw)
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"The body is not valid UTF-8: {exc.reason}",
                              _failing_field(raw), "invalid_json") from exc
    except RecursionError as exc:
        raise BadRequestError(f"The body nests JSON deeper than {MAX_DEPTH} levels",
                              _field_at(raw, None), "invalid_json") from exc
    except msgspec.DecodeError as exc:
        at = _DECODE_AT.search(str(exc))
        param = None
        if at is not None:
            param = at.group(2) or (_field_at(raw, int(at.group(1))) if at.group(1) else None)
        param = param or _failing_field(raw)
        raise BadRequestError(f"The body is not valid JSON: {exc}", param,
                              "invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object", None)
    for key, value in body.items():
        kind = type(value)
        if (kind is dict or kind is list) and _too_deep(value, 2):
            raise BadRequestError(f"'{key}' nests JSON deeper than {MAX_DEPTH} levels", key,
                                  "invalid_json")
    return body


def _int_field(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or not minimum <= value <= MAX_COUNT:
        raise BadRequestError(f"'{name}' must be an integer from {minimum} to {MAX_COUNT} "
                              f"(or null)", name)
    return value


def _bool_field(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise BadRequestError(f"'{name}' must be a boolean", name)
    return value


def _optional(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadRequestError(f"'{name}' must be {what}", name)
    return value


def _encoded_size(value: Any) -> int:
    return len(msgspec.json.encode(value)) if value is not None else 0


@dataclass(frozen=True, slots=True)
class _Common:
    """Fields both endpoints share."""

    body: dict[str, Any]
    """The decoded body, forwarded as it is (only :mod:`.upstream` changes it)."""
    model: str
    stream: bool
    output_bound: int | None
    """The engine's per-sequence output bound from the body (None: absent or null)."""
    output_param: str
    """The field that bound was read from (what an error about it names)."""
    sequences: int
    """max(n, best_of): sequences the engine generates."""
    prompt_tokens_bound: int
    """Tokens the prompt costs at most (see the module's notes)."""
    cache_salt: str | None


@dataclass(frozen=True, slots=True)
class CompletionRequest(_Common):
    """A ``/v1/completions`` body."""

    prompts: tuple[str | tuple[int, ...], ...] = ()
    """Every prompt of the request, text or token ids."""
    add_special_tokens: bool = True

    @property
    def kind(self) -> Literal["completions"]:
        return "completions"

    @property
    def routing_prompt(self) -> str | tuple[int, ...]:
        """The prompt a batch is routed (and prefix-scored) by: its first."""
        return self.prompts[0]


@dataclass(frozen=True, slots=True)
class ChatRequest(_Common):
    """A ``/v1/chat/completions`` body."""

    messages: tuple[dict[str, Any], ...] = ()
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    """``tools`` (or the legacy ``functions``) as sent."""

    @property
    def kind(self) -> Literal["chat"]:
        return "chat"



OpenAIRequest = CompletionRequest | ChatRequest


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    error = BadRequestError("'prompt' must be a string, a list of strings, a list of token ids "
                            "or a list of token-id lists", "prompt")
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise error
    if set(map(type, value)) == {int}:
        return (tuple(value),)
    prompts: list[str | tuple[int, ...]] = []
    for item in value:
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and set(map(type, item)) == {int}:
            prompts.append(tuple(item))
        else:
            raise error
    return tuple(prompts)


def _prompt_bound(prompts: tuple[str | tuple[int, ...], ...]) -> int:
    total = 0
    for prompt in prompts:
        if isinstance(prompt, str):
            total += len(prompt.encode("utf-8", "surrogatepass")) + SPECIAL_TOKENS_PER_PROMPT
        else:
            total += len(prompt)
    return total


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise BadRequestError("'messages' is required and must be a non-empty list",
                              "messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequestError(f"'messages[{i}]' must be an object with a 'role'",
                                  "messages")
        if not isinstance(message.get("role"), str):
            raise BadRequestError(f"'messages[{i}].role' must be a string", "messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise BadRequestError(f"'messages[{i}].content' must be a string or a list of "
                                  f"content parts", "messages")
    return tuple(value)


def _message_bound(message: dict[str, Any]) -> int:
    total = MESSAGE_TOKENS
    for key, value in message.items():
        if key != "content":
            total += len(key) + _encoded_size(value)
            continue
        if isinstance(value, str):
            total += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, list):
            for part in value:
                kind = part.get("type")
                if kind in MEDIA_PARTS or any(k in part for k in MEDIA_PARTS):
                    total += IMAGE_TOKENS
                elif isinstance(part.get("text"), str):
                    total += len(part["text"].encode("utf-8", "surrogatepass"))
                else:
                    total += _encoded_size(part)
    return total


def _common(body: dict[str, Any], kind: Literal["completions", "chat"]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' is required and must be a non-empty string", "model")
    stream = _bool_field(body, "stream", False)
    max_tokens = _int_field(body, "max_tokens", 0)
    max_completion = _int_field(body, "max_completion_tokens", 0)
    bound: int | None = max_tokens
    param = "max_tokens"
    if kind == "chat" and max_completion is not None:
        bound, param = max_completion, "max_completion_tokens"
    n = _int_field(body, "n", 1) or 1
    best_of = _int_field(body, "best_of", 1) or 1
    salt = _optional(body, "cache_salt", str, "a string")
    return {"body": body, "model": model, "stream": stream, "output_bound": bound,
            "output_param": param, "sequences": max(n, best_of), "cache_salt": salt}


def parse_request(body: dict[str, Any], kind: Literal["completions", "chat"]) -> OpenAIRequest:
    """The typed request of a decoded body; BadRequestError names the first bad field."""
    common = _common(body, kind)
    if kind == "chat":
        messages = _messages(body.get("messages"))
        tools = _optional(body, "tools", list, "a list")
        functions = _optional(body, "functions", list, "a list")
        kwargs = _optional(body, "chat_template_kwargs", dict, "an object")
        template = _optional(body, "chat_template", str, "a string")
        bound = (CHAT_TEMPLATE_TOKENS + sum(_message_bound(m) for m in messages)
                 + _encoded_size(tools) + _encoded_size(functions) + _encoded_size(kwargs)
                 + (len(template.encode("utf-8", "surrogatepass")) if template else 0))
        return ChatRequest(
            **common, prompt_tokens_bound=bound, messages=messages,
            add_generation_prompt=_bool_field(body, "add_generation_prompt", True),
            continue_final_message=_bool_field(body, "continue_final_message", False),
            add_special_tokens=_bool_field(body, "add_special_tokens", False),
            chat_template=template, chat_template_kwargs=kwargs,
            tools=tools if tools is not None else functions)
    if "prompt" not in body:
        raise BadRequestError("'prompt' is required", "prompt")
    prompts = _prompts(body["prompt"])
    return CompletionRequest(**common, prompt_tokens_bound=_prompt_bound(prompts),
                             prompts=prompts,
                             add_special_tokens=_bool_field(body, "add_special_tokens", True))


def parse_body(raw: bytes, kind: Literal["completions", "chat"]) -> OpenAIRequest:
    """:func:`decode_body` then :func:`parse_request`."""
    return parse_request(decode_body(raw), kind)


def render_chat_prompt(messages: Any) -> str:
    """Chat messages as one string for prefix hashing: role and text of each message in order.

    Only text matters for prefix affinity; image parts and unknown shapes are skipped."""
    if not isinstance(messages, (list, tuple)):
        return ""
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts.append(f"<|{message.get('role', '')}|>")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
        parts.append("\n")
    return "".join(parts)


def routing_text(request: OpenAIRequest) -> tuple[str, list[int] | None]:
    """(text, token ids) the prefix scorers hash: the rendered chat, or the first prompt."""
    if isinstance(request, ChatRequest):
        return render_chat_prompt(request.messages), None
    prompt = request.routing_prompt
    if isinstance(prompt, str):
        return prompt, None
    return "", list(prompt)


"""Cached answers: recorded from an engine's reply (JSON or SSE), replayed in the form the
client asks for.

An answer is kept as the non-streaming OpenAI object (``chat.completion`` or
``text_completion``) with its ``usage``. :class:`AnswerRecorder` assembles it from the bytes the
engine sent: a JSON body, or a stream of ``data:`` events that must end with ``[DONE]`` and
give every choice a ``finish_reason`` — a cut stream, an error event, an HTTP error or an
answer over :data:`MAX_ANSWER_BYTES` is never recorded. Tool-call deltas of a chat stream are
assembled by their ``index`` into ``message.tool_calls`` (``id``, ``type`` and the function's
``name`` from the deltas that carry them, ``arguments`` concatenated), as the JSON answer has
them; a malformed tool-call delta makes the stream unrecordable.

:func:`render` replays an answer as JSON or as SSE chunks (role, content, finish, usage,
``[DONE]``), with a fresh ``id`` and ``created`` and the model name the client sent.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

MAX_ANSWER_BYTES = 1 << 20
"""Largest answer recorded (bytes as received)."""


class AnswerRecorder:
    """Collects one engine reply; ``answer()`` is the assembled object or None."""

    def __init__(self, kind: str, stream: bool) -> None:
        self.kind = kind
        self.stream = stream
        self._parts: list[bytes] = []
        self._size = 0
        self.overflow = False

    def feed(self, chunk: bytes) -> None:
        if self.overflow or not chunk:
            return
        self._size += len(chunk)
        if self._size > MAX_ANSWER_BYTES:
            self.overflow = True
            self._parts.clear()
            return
        self._parts.append(chunk)

    def answer(self, status: int) -> dict[str, Any] | None:
        """The complete, successful answer, or None (error, cut, too large, unparsable)."""
        if status != 200 or self.overflow or not self._parts:
            return None
        raw = b"".join(self._parts)
        if raw.lstrip().startswith(b"{"):
            return _json_answer(raw)
        return _assemble_stream(raw, self.kind)


def _json_answer(raw: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(value, dict) or "error" in value:
        return None
    choices = value.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    if any(not isinstance(c, dict) or c.get("finish_reason") is None for c in choices):
        return None
    return value


def _events(raw: bytes) -> tuple[list[dict[str, Any]], bool] | None:
    events: list[dict[str, Any]] = []
    done = False
    for line in raw.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        if done:
            return None  # data after [DONE]: not a stream we understand
        try:
            event = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        if not isinstance(event, dict) or "error" in event:
            return None
        events.append(event)
    return events, done


def _assemble_stream(raw: bytes, kind: str) -> dict[str, Any] | None:
    parsed = _events(raw)
    if parsed is None:
        return None
    events, done = parsed
    if not done or not events:
        return None
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    for event in events:
        if isinstance(event.get("usage"), dict):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                return None
            index = choice.get("index", 0)
            if not isinstance(index, int):
                return None
            slot = choices.setdefault(index, {"index": index, "text": [], "finish": None,
                                              "role": "assistant", "tools": {}})
            if kind == "chat":
                delta = choice.get("delta") or {}
                if not isinstance(delta, dict):
                    return None
                if delta.get("tool_calls") and not _add_tool_calls(slot["tools"],
                                                                   delta["tool_calls"]):
                    return None
                if isinstance(delta.get("role"), str):
                    slot["role"] = delta["role"]
                if isinstance(delta.get("content"), str):
                    slot["text"].append(delta["content"])
            elif isinstance(choice.get("text"), str):
                slot["text"].append(choice["text"])
            if choice.get("finish_reason") is not None:
                slot["finish"] = choice["finish_reason"]
    if not choices or any(c["finish"] is None for c in choices.values()):
        return None
    first = events[0]
    out: list[dict[str, Any]] = []
    for index in sorted(choices):
        c = choices[index]
        text = "".join(c["text"])
        if kind == "chat":
            message: dict[str, Any] = {"role": c["role"], "content": text}
            if c["tools"]:
                message["content"] = text or None
                message["tool_calls"] = [_tool_call(c["tools"][i]) for i in sorted(c["tools"])]
            out.append({"index": index, "message": message, "finish_reason": c["finish"]})
        else:
            out.append({"index": index, "text": text, "finish_reason": c["finish"]})
    answer: dict[str, Any] = {
        "id": first.get("id", ""), "object": "chat.completion" if kind == "chat"
        else "text_completion", "created": first.get("created", 0),
        "model": first.get("model", ""), "choices": out}
    if usage is not None:
        answer["usage"] = usage
    return answer


def _add_tool_calls(tools: dict[int, dict[str, Any]], deltas: Any) -> bool:
    """Merge one delta's ``tool_calls`` into ``tools`` (by ``index``); False: malformed."""
    if not isinstance(deltas, list):
        return False
    for call in deltas:
        if not isinstance(call, dict) or not isinstance(call.get("index"), int):
            return False
        function = call.get("function") or {}
        if not isinstance(function, dict):
            return False
        slot = tools.setdefault(call["index"], {"id": None, "type": None, "name": None,
                                                "arguments": []})
        for field, value in (("id", call.get("id")), ("type", call.get("type")),
                             ("name", function.get("name"))):
            if value is None:
                continue
            if not isinstance(value, str):
                return False
            slot[field] = value
        arguments = function.get("arguments")
        if arguments is not None:
            if not isinstance(arguments, str):
                return False
            slot["arguments"].append(arguments)
    return True


def _tool_call(slot: dict[str, Any]) -> dict[str, Any]:
    return {"id": slot["id"] or "", "type": slot["type"] or "function",
            "function": {"name": slot["name"] or "", "arguments": "".join(slot["arguments"])}}


def render_json(answer: dict[str, Any], kind: str, model: str) -> bytes:
    """The answer as a non-streaming response body."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return msgspec.json.encode({**answer, "id": f"{prefix}-{uuid.uuid4().hex}",
                                "created": int(time.time()), "model": model})


def render_sse(answer: dict[str, Any], kind: str, model: str, include_usage: bool) -> bytes:
    """The answer as SSE chunks ending with ``data: [DONE]``. ``usage`` rides on the last
    choice chunk, or (``stream_options.include_usage``) on its own chunk with no choices, as
    OpenAI and vLLM send it."""
    prefix, obj = (("chatcmpl", "chat.completion.chunk") if kind == "chat"
                   else ("cmpl", "text_completion"))
    base = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": model}
    usage = answer.get("usage")
    chunks: list[dict[str, Any]] = []
    choices = [c for c in answer.get("choices") or [] if isinstance(c, dict)]
    for choice in choices:
        index = choice.get("index", 0)
        if kind == "chat":
            message = choice.get("message") or {}
            chunks.append({**base, "choices": [{"index": index, "delta": {
                "role": message.get("role", "assistant"), "content": ""},
                "finish_reason": None}]})
            delta: dict[str, Any] = {}
            if message.get("content"):
                delta["content"] = message["content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call}
                                       for i, call in enumerate(message["tool_calls"])]
            if delta:
                chunks.append({**base, "choices": [{"index": index, "delta": delta,
                                                    "finish_reason": None}]})
            chunks.append({**base, "choices": [{"index": index, "delta": {},
                                                "finish_reason": choice.get("finish_reason")}]})
        else:
            if choice.get("text"):
                chunks.append({**base, "choices": [{"index": index, "text": choice["text"],
                                                    "finish_reason": None}]})
            chunks.append({**base, "choices": [{"index": index, "text": "",
                                                "finish_reason": choice.get("finish_reason")}]})
    if usage is not None:
        if include_usage:
            chunks.append({**base, "choices": [], "usage": usage})
        elif chunks:
            chunks[-1] = {**chunks[-1], "usage": usage}
    out = bytearray()
    for chunk in chunks:
        out += b"data: " + msgspec.json.encode(chunk) + b"\n\n"
    out += b"data: [DONE]\n\n"
    return bytes(out)


def usage_tokens(answer: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of an answer's ``usage`` (0 when absent)."""
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)


__all__ = ["MAX_ANSWER_BYTES", "AnswerRecorder", "render_json", "render_sse", "usage_tokens"]

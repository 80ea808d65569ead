"""Reading what an engine answered: the token ``usage`` and streamed (SSE) events.

The router keeps only the last :data:`USAGE_TAIL` bytes of an answer. A stream's usage is in
its last ``data:`` event that carries one (``stream_options.include_usage``); a whole answer's
usage is its top-level ``usage`` object. Both are decoded as JSON, so nested fields such as
vLLM's ``prompt_tokens_details`` are read like any other.
"""

from __future__ import annotations

from typing import Any

import msgspec

USAGE_TAIL = 8192
"""Bytes of an answer's end kept to find its usage (vLLM's usage event is ~200 bytes)."""

_DATA = b"data:"


def _tokens(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if type(prompt) is int and prompt >= 0 else None,
            completion if type(completion) is int and completion >= 0 else None)


def _object_at(text: bytes, start: int) -> bytes | None:
    """The JSON object beginning at ``text[start] == b"{"`` (strings and escapes respected),
    or None when it does not end inside ``text``."""
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def usage_of(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of the answer whose last bytes are ``tail``; None when the
    answer has no (readable) usage."""
    at = tail.rfind(b'"usage"')
    if at == -1:
        return None, None
    # A stream: the last complete ``data:`` event that has a usage object.
    line_start = tail.rfind(b"\n", 0, at) + 1
    if tail.startswith(_DATA, line_start):
        line_end = tail.find(b"\n", at)
        event = tail[line_start + len(_DATA):line_end if line_end != -1 else len(tail)]
        try:
            decoded = msgspec.json.decode(event.strip())
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            decoded = None
        if isinstance(decoded, dict):
            return _tokens(decoded.get("usage"))
    # A whole answer (possibly cut at the front): decode the usage object itself.
    colon = tail.find(b":", at + len(b'"usage"'))
    if colon == -1:
        return None, None
    start = colon + 1
    while start < len(tail) and tail[start] in b" \t\r\n":
        start += 1
    if start >= len(tail) or tail[start] != 0x7B:
        return None, None  # "usage": null
    found = _object_at(tail, start)
    if found is None:
        return None, None
    try:
        return _tokens(msgspec.json.decode(found))
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None, None


def streamed_events(previous: bytes, chunk: bytes) -> int:
    """``data: {`` events that end in ``chunk`` (``previous``: the bytes before it, so an event
    marker split across chunks is counted once)."""
    marker = b"data: {"
    carry = previous[-(len(marker) - 1):]
    return (carry + chunk).count(marker) - carry.count(marker)


def streamed_tokens(events: int, kind: str) -> int:
    """Completion tokens of a stream without ``usage``: one per data event (vLLM sends a
    token per event; chat streams open with a role-only event)."""
    return max(0, events - (1 if kind == "chat" else 0))


class UsageEventFilter:
    """The bytes a client gets from a stream whose usage event the router asked for and the
    client did not: every event but the usage-only one (``"choices": []`` with a ``usage``
    object), relayed at event boundaries (``\n\n``); what follows the last boundary waits for
    the next chunk (or :meth:`flush`)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = data.rfind(b"\n\n")
        if cut == -1:
            self._pending = data
            return b""
        complete, self._pending = data[:cut + 2], data[cut + 2:]
        if b'"choices":[]' not in complete and b'"choices": []' not in complete:
            return complete
        kept = [event for event in complete.split(b"\n\n")[:-1] if not _usage_only(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def _usage_only(event: bytes) -> bool:
    if not event.startswith(b"data: {"):
        return False
    try:
        decoded = msgspec.json.decode(event[6:])
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return False
    return (isinstance(decoded, dict) and decoded.get("choices") == []
            and isinstance(decoded.get("usage"), dict))

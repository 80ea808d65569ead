"""Reads an OpenAI completions or chat-completions body into an :class:`LLMRequest`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from kvroute_router.framework.request import LLMRequest, RequestKind, render_chat_prompt


class BadRequestError(ValueError):
    """The body is not a usable OpenAI request; the message names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _prompt_text(prompt: Any) -> tuple[str, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first, None  # a batch of prompts: route by the first
        if isinstance(first, int) and all(isinstance(t, int) for t in prompt):
            return "", list(prompt)
        if isinstance(first, list) and all(isinstance(t, int) for t in first):
            return "", list(first)
    raise BadRequestError("'prompt' must be a string, a list of strings or a list of token ids",
                          "prompt")


def request_from_body(body: Any, kind: RequestKind, headers: Mapping[str, str]) -> LLMRequest:
    """The routing view of an OpenAI body; raises BadRequestError naming the bad field."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' is required and must be a non-empty string", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 0):
        raise BadRequestError("'max_tokens' must be a non-negative integer", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean", "stream")
    token_ids: list[int] | None = None
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' is required and must be a non-empty list",
                                  "messages")
        text = render_chat_prompt(messages)
    else:
        if "prompt" not in body:
            raise BadRequestError("'prompt' is required", "prompt")
        text, token_ids = _prompt_text(body["prompt"])
    request = LLMRequest(model=model, kind=kind, prompt_text=text, token_ids=token_ids,
                         headers=headers, body=body, max_tokens=max_tokens, stream=stream)
    supplied = headers.get("x-request-id")
    if supplied:
        request.request_id = supplied[:128]
    return request


def usage_of(tail: bytes) -> tuple[int | None, int | None]:
    """prompt/completion tokens from the last ``usage`` object in the answer, if any."""
    at = tail.rfind(b'"usage"')
    if at == -1:
        return None, None
    start = tail.find(b"{", at)
    end = tail.find(b"}", start)
    if start == -1 or end == -1:
        return None, None
    try:
        usage = msgspec.json.decode(tail[start:end + 1])
    except msgspec.DecodeError:
        return None, None
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else None,
            completion if isinstance(completion, int) else None)


def streamed_events(previous: bytes, chunk: bytes) -> int:
    """``data: {`` events that end in ``chunk`` (``previous``: the bytes before it, so an event
    marker split across chunks is counted once)."""
    marker = b"data: {"
    carry = previous[-(len(marker) - 1):]
    return (carry + chunk).count(marker) - carry.count(marker)

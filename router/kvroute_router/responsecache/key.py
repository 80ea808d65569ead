"""The cache key of an OpenAI request: what must be equal for an answer to be reused.

Two keys per request:

* ``exact`` — SHA-256 of a canonical JSON of everything that shapes the answer: the scope
  (policy and, for ``scope: Tenant``, the tenant), the endpoint kind, the model, the prompt or
  every message (text normalised: Unicode NFC, surrounding whitespace stripped, text parts of a
  content list joined), and every other body field — sampling parameters (``temperature``,
  ``top_p``, ``max_tokens``, ``seed``, ``stop``, ``n`` …), ``tools``, ``tool_choice``,
  ``response_format``. Fields that only change the *form* of the answer or are bookkeeping
  (``stream``, ``stream_options``, ``user``, ``metadata``, ``store``) are left out, so a JSON
  request hits an answer first streamed, and the other way round.
* ``partition`` — the same with the *query text* (the prompt, or the content of the last
  message when it is a user message) left out: semantic lookups compare the query text only
  with entries of the same partition, i.e. the same conversation before it, the same system
  prompt, tools and sampling parameters.

``cacheability`` says why a request must not use the cache: sampling (``temperature`` > 0 or
absent — OpenAI's and vLLM's default is to sample — unless ``allowSampling``), ``n`` > 1 with
sampling, or a prompt of token ids (exact lookup only: no text to embed).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any

import msgspec

FORM_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store",
                         "model", "messages", "prompt"})
"""Body fields not hashed as they are: form and bookkeeping, or normalised separately."""


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The keys of one request."""

    exact: str
    """Hex SHA-256 of the whole normalised request."""
    partition: str
    """Hex SHA-256 of the request without its query text (semantic lookups stay inside)."""
    text: str | None
    """The query text to embed; None: exact lookup only."""


def normalise_text(text: str) -> str:
    """NFC, surrounding whitespace stripped (inner whitespace kept: it may matter, e.g. code)."""
    return unicodedata.normalize("NFC", text).strip()


def _content(content: Any) -> Any:
    if isinstance(content, str):
        return normalise_text(content)
    if isinstance(content, list):
        parts: list[Any] = []
        texts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                parts.append(part)  # images, audio …: hashed as sent
        joined = normalise_text("".join(texts))
        return joined if not parts else [joined, *parts]
    return content


def _message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    return {k: (_content(v) if k == "content" else v) for k, v in message.items()}


def _digest(value: Any) -> str:
    return hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()


def cache_key(body: dict[str, Any], kind: str, model: str, scope: str) -> CacheKey:
    """The keys of ``body`` (an OpenAI completions or chat body) for ``model`` (the name the
    policy owns) in ``scope`` (policy key, plus the tenant for ``scope: Tenant``)."""
    rest = {k: v for k, v in body.items() if k not in FORM_FIELDS}
    head: dict[str, Any] = {"scope": scope, "kind": kind, "model": model, "params": rest}
    text: str | None = None
    if kind == "chat":
        messages = [_message(m) for m in body.get("messages") or []]
        last = messages[-1] if messages else None
        if (isinstance(last, dict) and last.get("role") == "user"
                and isinstance(last.get("content"), str) and set(last) <= {"role", "content"}):
            text = last["content"]
            context: list[Any] = [*messages[:-1], {"role": "user"}]
        else:
            context = messages
        exact = _digest({**head, "messages": messages})
        partition = _digest({**head, "context": context})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            text = normalise_text(prompt)
            exact = _digest({**head, "prompt": text})
        else:
            exact = _digest({**head, "prompt": prompt})
        partition = _digest({**head, "context": None})
    return CacheKey(exact=exact, partition=partition, text=text or None)


def cacheability(body: dict[str, Any], allow_sampling: bool) -> str | None:
    """None when the request may use the cache, else the reason it may not (a metric label)."""
    temperature = body.get("temperature")
    sampling = not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                    and temperature <= 0)
    if sampling and not allow_sampling:
        return "sampling"
    return None


__all__ = ["CacheKey", "cache_key", "cacheability", "normalise_text"]

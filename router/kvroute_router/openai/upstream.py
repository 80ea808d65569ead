"""The body forwarded to the engine: the client's bytes, unless the router must change them.

Two changes exist: ``model`` becomes the pool's served name, and the output bound the router
admitted is written in the field the engine reads (``max_tokens`` on ``/v1/completions``;
``max_completion_tokens`` when a chat body sets it, else ``max_tokens``) whenever the body's
own bound for the engine is absent, null or larger — so the engine can never generate more
than was admitted and reserved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


def upstream_changes(body: Mapping[str, Any], kind: str, served_model: str,
                     bound: int | None) -> dict[str, Any]:
    """Fields of ``body`` (a ``kind`` request: completions or chat) to overwrite."""
    changes: dict[str, Any] = {}
    if body.get("model") != served_model:
        changes["model"] = served_model
    if bound is None:
        return changes
    field = ("max_completion_tokens"
             if kind == "chat" and body.get("max_completion_tokens") is not None
             else "max_tokens")
    current = body.get(field)
    if type(current) is not int or current > bound:
        changes[field] = bound
    return changes


def upstream_body(raw: bytes, body: Mapping[str, Any], kind: str, served_model: str,
                  bound: int | None) -> bytes:
    """The bytes to forward: ``raw`` unchanged when nothing needs changing."""
    changes = upstream_changes(body, kind, served_model, bound)
    if not changes:
        return raw
    return msgspec.json.encode({**body, **changes})

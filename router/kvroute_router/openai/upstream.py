"""The body forwarded to the engine: the client's bytes, unless the router must change them.

Three changes exist: ``model`` becomes the pool's served name; ``priority`` becomes the
router's own when the pool's engines run priority scheduling
(:meth:`~kvroute_router.director.Decision.engine_priority`: a client's value would jump the
engines' queues); and the output bound the router
admitted is written in the field the engine reads (``max_tokens`` on ``/v1/completions``;
``max_completion_tokens`` when a chat body sets it, else ``max_tokens``) whenever the body's
own bound for the engine is absent, null or larger — so the engine can never generate more
than was admitted and reserved. On the proxy path a stream that does not ask for usage gets
``stream_options.include_usage`` (``request_usage``): the engine's own count settles the budget
(vLLM merges tokens that queue up into one event under load, so counting events undercounts),
and the proxy drops that usage event from what the client sees
(:class:`~kvroute_router.openai.usage.UsageEventFilter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

PRIORITY_HEADER = "x-vllm-priority"
"""vLLM's header that overrides the body's ``priority`` (an integer value wins). Dropped from
what reaches an engine whenever the router sets the priority, or a client would take back the
queue position the body's overwrite took from it."""


def usage_injected(body: Mapping[str, Any]) -> bool:
    """A stream whose client did not ask for the final usage event (the proxy asks for it)."""
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def upstream_changes(body: Mapping[str, Any], kind: str, served_model: str,
                     bound: int | None, request_usage: bool = False,
                     priority: int | None = None) -> dict[str, Any]:
    """Fields of ``body`` (a ``kind`` request: completions or chat) to overwrite."""
    changes: dict[str, Any] = {}
    if body.get("model") != served_model:
        changes["model"] = served_model
    if priority is not None and (type(body.get("priority")) is not int
                                 or body["priority"] != priority):
        changes["priority"] = priority
    if request_usage and usage_injected(body):
        options = body.get("stream_options")
        changes["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
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
                  bound: int | None, request_usage: bool = False,
                  priority: int | None = None) -> bytes:
    """The bytes to forward: ``raw`` unchanged when nothing needs changing."""
    changes = upstream_changes(body, kind, served_model, bound, request_usage, priority)
    if not changes:
        return raw
    return msgspec.json.encode({**body, **changes})

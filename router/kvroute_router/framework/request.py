"""The routing request: what every entry point (OpenAI proxy, Envoy ext_proc, gRPC Pick)
extracts from its input before asking the director for an endpoint."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RequestKind = Literal["completions", "chat", "pick"]


@dataclass(slots=True)
class LLMRequest:
    """One inference request being routed."""

    model: str
    """The model name the client asked for (a RoutePolicy's match.model or a pool's model)."""
    kind: RequestKind = "completions"
    prompt_text: str = ""
    """The prompt as text (chat messages rendered role by role); the prefix scorers hash it."""
    token_ids: list[int] | None = None
    """The prompt as token ids, when the caller already tokenised it (gRPC Pick)."""
    tenant: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """Lower-case request headers."""
    body: dict[str, Any] | None = None
    """The parsed OpenAI body (proxy and ext_proc), for plugins that need more fields."""
    max_tokens: int | None = None
    stream: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    allowed_addresses: frozenset[str] | None = None
    """When set, only endpoints with these addresses may be picked (Envoy subset hint)."""
    lora_adapter: str | None = None
    """The LoRA adapter named by ``model`` when it is not the pool's base model."""

    def prompt_size_estimate(self) -> int:
        """Tokens in the prompt: exact with token ids, else a low estimate from UTF-8 bytes
        (4 bytes a token), so that limits never reject a prompt that would fit."""
        if self.token_ids is not None:
            return len(self.token_ids)
        return len(self.prompt_text.encode("utf-8", "replace")) // 4


def render_chat_prompt(messages: Any) -> str:
    """Chat messages as one string for prefix hashing: role and text of each message in order.

    Only text matters for prefix affinity; image parts and unknown shapes are skipped, so a
    malformed message never fails routing (the engine validates the body)."""
    if not isinstance(messages, list):
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

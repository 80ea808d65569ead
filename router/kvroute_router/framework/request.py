"""The routing request: what every entry point (OpenAI proxy, Envoy ext_proc, gRPC Pick)
extracts from its input before asking the director for an endpoint."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kvroute_router.openai.requests import CompletionRequest, OpenAIRequest, routing_text

RequestKind = Literal["completions", "chat", "pick"]


def unheld_share(held: float | None) -> float:
    """The share of a prompt still to compute when ``held`` (0-1; None: nothing) is cached."""
    return 1.0 - min(1.0, max(0.0, held or 0.0))


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
    openai: OpenAIRequest | None = None
    """The typed OpenAI request (proxy, ext_proc and chat Picks), for plugins that need more
    fields (the chat template's options, ``cache_salt``)."""
    max_tokens: int | None = None
    """The per-sequence output bound the engine will use; None: not bounded by the request.
    Admission fills it in (then it is written upstream)."""
    output_param: str = "max_tokens"
    """The body field ``max_tokens`` was read from (what an error about it names)."""
    sequences: int = 1
    """Sequences the engine generates (``max(n, best_of)``); reservations multiply by it."""
    prompt_tokens_bound: int | None = None
    """Prompt tokens at most, over every prompt, tools, images and the chat template (None:
    derive it from ``token_ids`` / ``prompt_text``)."""
    stream: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    received_unix_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    """When the router took the request (wall clock, so replicas agree): the base of the
    vLLM ``priority`` it sets for engines that run priority scheduling
    (:meth:`~kvroute_router.director.Decision.engine_priority`)."""
    newest_first: bool = False
    """The admission queue let this request go newest-first (``spec.admission.
    newestFirstAfterMs``, adaptive LIFO under overload): the engines serve it newest-first
    too (:meth:`engine_priority`)."""
    allowed_addresses: frozenset[str] | None = None
    """When set, only endpoints with these addresses may be picked (Envoy subset hint)."""
    lora_adapter: str | None = None
    """The LoRA adapter named by ``model`` when it is not the pool's base model."""

    @classmethod
    def from_openai(cls, parsed: OpenAIRequest, headers: Mapping[str, str]) -> LLMRequest:
        """The routing view of a parsed OpenAI request (``x-request-id`` is kept, capped)."""
        text, token_ids = routing_text(parsed)
        request = cls(model=parsed.model, kind=parsed.kind, prompt_text=text,
                      token_ids=token_ids, headers=headers, openai=parsed,
                      max_tokens=parsed.output_bound, output_param=parsed.output_param,
                      sequences=parsed.sequences, prompt_tokens_bound=parsed.prompt_tokens_bound,
                      stream=parsed.stream)
        supplied = headers.get("x-request-id")
        if supplied:
            request.request_id = supplied[:128]
        return request

    def prompt_size_estimate(self) -> int:
        """Tokens in the prompt (the largest of a batch): exact with token ids, else a low
        estimate from UTF-8 bytes (4 bytes a token), so that limits never reject a prompt
        that would fit."""
        if isinstance(self.openai, CompletionRequest) and len(self.openai.prompts) > 1:
            return max(len(p) if isinstance(p, tuple) else len(p.encode("utf-8", "replace")) // 4
                       for p in self.openai.prompts)
        if self.token_ids is not None:
            return len(self.token_ids)
        return len(self.prompt_text.encode("utf-8", "replace")) // 4

    def prefill_tokens(self, held: float | None) -> float:
        """Prompt tokens an engine computes for this request when it already holds ``held``
        (0-1, a prefix scorer's match ratio; None: unknown, nothing held) of the prompt:
        :meth:`prompt_size_estimate` times the rest, in whole tokens (so that adding them to a
        backlog and taking them off again leaves exactly 0). One estimate for the
        ``prefill-cost`` scorer and the per-endpoint backlog, so the two add up in one unit."""
        return float(round(self.prompt_size_estimate() * unheld_share(held)))

    def engine_priority(self, uncached_tokens: float, ms_per_token: float) -> int:
        """The vLLM ``priority`` for an engine that must compute ``uncached_tokens`` of the
        prompt: arrival in ms plus ``ms_per_token`` per such token. Lower is served first, so
        a prompt mostly cached there goes ahead of a long miss that arrived up to the miss's
        penalty earlier, and never further (no starvation). A request the admission queue let
        go newest-first (:attr:`newest_first`) counts its arrival negated: ahead of every
        request ranked by arrival, the newest of them first."""
        arrival = -self.received_unix_ms if self.newest_first else self.received_unix_ms
        return arrival + round(ms_per_token * uncached_tokens)

    def prompt_upper_bound(self) -> int:
        """Prompt tokens, never underestimated: the parsed bound when there is one, else exact
        with token ids, else UTF-8 bytes (no tokenizer emits more tokens than bytes)."""
        if self.prompt_tokens_bound is not None:
            return self.prompt_tokens_bound
        if self.token_ids is not None:
            return len(self.token_ids)
        return len(self.prompt_text.encode("utf-8", "replace"))

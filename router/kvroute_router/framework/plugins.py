"""The plugin interfaces of the scheduler: filters narrow the candidate endpoints, scorers give
each a score in [0, 1] (the profile clamps and weights them), one picker orders the candidates
(the first is the target, the rest are fallbacks). ``DispatchObserver`` lets a plugin learn
from the decision (the approximate prefix scorer records the blocks it routed).

Every plugin class declares ``TYPE`` (its registry key) and instances carry a ``name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.request import LLMRequest


@runtime_checkable
class Filter(Protocol):
    """Removes endpoints that must not serve the request."""

    @property
    def name(self) -> str: ...

    def filter(self, state: CycleState, request: LLMRequest,
               endpoints: Sequence[Endpoint]) -> list[Endpoint]: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores every candidate; one float per endpoint, in the order given. Values outside
    [0, 1] are clamped by the profile."""

    @property
    def name(self) -> str: ...

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> Sequence[float]: ...


@dataclass(slots=True)
class ScoredEndpoint:
    """A candidate with its weighted total and the per-scorer scores behind it."""

    endpoint: Endpoint
    total: float = 0.0
    by_scorer: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Picker(Protocol):
    """Orders the scored candidates: target first, then fallbacks (at most ``limit``)."""

    @property
    def name(self) -> str: ...

    def pick(self, state: CycleState, request: LLMRequest,
             scored: Sequence[ScoredEndpoint], limit: int) -> list[ScoredEndpoint]: ...


@runtime_checkable
class DispatchObserver(Protocol):
    """Told when the request is sent to an endpoint (after the pick, once per attempt)."""

    def on_dispatch(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> None: ...

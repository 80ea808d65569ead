"""``prefill-cost``: prefers the endpoint that reaches this request's first token with the
fewest prompt tokens still to compute — cache affinity and load in one unit.

An endpoint's cost is its **prefill backlog** (``Endpoint.prefill_backlog``: the prompt tokens
this router — and, with replica sync, every other replica — sent it that it has not started
answering, each counted without the part the endpoint held at dispatch) plus **this request's
own prefill there** (the prompt minus the share the endpoint holds, from the policy's prefix
scorers through ``profile.STATE_PREFIX_HELD``; without a prefix scorer, the whole prompt),
weighted by ``scoring.prefillMissWeight`` (default 3): a token recomputed elsewhere costs this
request's wait *and* the fleet's capacity and the context it evicts there, which a greedy
weight of 1 ignores — at 1, tenants left their holders at the slightest queue difference and
the fleet kept 57 % of the oracle's hits, at 3 92 % (emulated-fleet.md, round 5). A tenant's
requests stay on the engine holding its context while that engine's queue of work is shorter
than recomputing the context elsewhere, and move when it is not, instead of trading a
normalised prefix score against a normalised request count as ``prefix-precise`` +
``queue-depth`` do.

Score: ``(min cost + 1) / (cost + 1)`` — 1 for the cheapest candidate, proportionally less for
the others (a candidate twice as costly scores about 0.5), so the score keeps its meaning when
weighted against other scorers.

What it cannot see: work other routers sent (replicas without replica sync, clients going
straight to the engine), and decode load. The ``load-headroom`` filter still removes hot
spots by queue depth before it scores, and the default policy adds ``running-requests`` at
0.02, which decides between endpoints this scorer finds (nearly) equal — for a prompt no
endpoint holds, often dozens with nothing left to prefill (emulated-fleet.md, rounds 25
and 28).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Self

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.profile import STATE_PREFIX_HELD
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest, unheld_share


class PrefillCostScorer:
    """Fewest prompt tokens to compute before this request's first token."""

    TYPE: ClassVar[str] = "prefill-cost"

    def __init__(self, miss_weight: float = 3.0) -> None:
        self.name = self.TYPE
        self.miss_weight = miss_weight

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        held = state.read(STATE_PREFIX_HELD, dict) or {}
        # LLMRequest.prefill_tokens per endpoint (the prompt's size estimated once), weighted.
        miss = float(request.prompt_size_estimate()) * self.miss_weight
        costs = [ep.prefill_backlog + miss * unheld_share(held.get(ep.name))
                 for ep in endpoints]
        if not costs:
            return []
        low = min(costs) + 1.0
        return [low / (cost + 1.0) for cost in costs]

    @classmethod
    def build(cls, context: PluginContext) -> Self:
        return cls(context.scoring.prefill_miss_weight)

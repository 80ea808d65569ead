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

With replica sync counting more than one replica routing, the weight is
``scoring.prefillMissWeightReplicas`` (default 10) instead: a replica learns the others'
dispatches a moment late, so the queue it would spill away from is less certain than one
router's, and a spill decided on it worth less — three synced replicas at 3 sent 36 % of
prompts away from their holder against one router's 28 % and lost 27 % TTFT p90 near
saturation; at 10 they were level (emulated-fleet.md, rounds 41 and 42).

A request the admission queue let go newest-first (``spec.admission.newestFirstAfterMs``)
to priority engines overtakes every arrival-ranked request queued there, so its backlog is
only the newest-first part (``Endpoint.prefill_backlog_ahead``), the queue order the router
itself sets there. Measured, it changes little: the same goodput in the simulator (three
seeds) and +4.5 % throughput in one fleet run, within the fleet's run-to-run spread
(emulated-fleet.md, round 44) — with the default miss weight the holder's backlog rarely
outweighs recomputing a 7k-token context anyway.

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
from kvroute_router.framework.registry import (
    REPLICA_COUNT,
    PluginContext,
    ReplicaCount,
    SharedServices,
)
from kvroute_router.framework.request import LLMRequest, unheld_share


class PrefillCostScorer:
    """Fewest prompt tokens to compute before this request's first token."""

    TYPE: ClassVar[str] = "prefill-cost"

    def __init__(self, miss_weight: float = 3.0, replicas_miss_weight: float | None = None,
                 services: SharedServices | None = None,
                 priority_engines: bool = False) -> None:
        self.name = self.TYPE
        self.priority_engines = priority_engines
        """The pool's engines run vLLM's priority scheduling (newest-first requests overtake
        there)."""
        self.miss_weight = miss_weight
        self.replicas_miss_weight = (miss_weight if replicas_miss_weight is None
                                     else replicas_miss_weight)
        self._services = services
        """Where replica sync's :class:`ReplicaCount` is, once the router has one (looked up
        per decision: replica sync may start after the profile is built)."""

    def weight(self) -> float:
        """The miss weight of this decision: ``replicas_miss_weight`` while replica sync counts
        more than one replica, ``miss_weight`` otherwise."""
        if self._services is None or self.replicas_miss_weight == self.miss_weight:
            return self.miss_weight
        replicas = self._services.get(REPLICA_COUNT, ReplicaCount)
        if replicas is None or replicas.count() <= 1:
            return self.miss_weight
        return self.replicas_miss_weight

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        held = state.read(STATE_PREFIX_HELD, dict) or {}
        # LLMRequest.prefill_tokens per endpoint (the prompt's size estimated once), weighted.
        miss = float(request.prompt_size_estimate()) * self.weight()
        newest_first = request.newest_first and self.priority_engines
        costs = [ep.prefill_backlog_ahead(newest_first) + miss * unheld_share(held.get(ep.name))
                 for ep in endpoints]
        if not costs:
            return []
        low = min(costs) + 1.0
        return [low / (cost + 1.0) for cost in costs]

    @classmethod
    def build(cls, context: PluginContext) -> Self:
        return cls(context.scoring.prefill_miss_weight,
                   context.scoring.prefill_miss_weight_replicas, context.services,
                   priority_engines=context.pool is not None
                   and context.pool.spec.engine.ranks_by_priority)

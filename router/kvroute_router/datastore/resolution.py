"""Which RoutePolicy a request lands on (docs/security.md, "Which policy a request lands on").

* **Only through a policy.** A pool that any RoutePolicy targets is reachable by its served
  model name only when it opts in (``spec.directAccess``); otherwise that name is not a model
  a client may use. A pool no policy targets stays reachable by its served name. Either way
  the served name resolves to an *implied default policy* over those pools (``implicit``),
  which the budget hook treats like any other policy (default admission, no budgets).
* **Scoped to a namespace.** With a scope (the trusted ``x-kvroute-namespace`` header, or the
  router's own namespace when it watches one), only that namespace's policies and pools are
  candidates.
* **Conflicts refused.** Among candidates whose ``match.headers`` all hold, the most specific
  wins; two equally specific ones raise :class:`PolicyConflictError` naming both — never a
  choice by name order. Policies the operator marked ``Accepted=False/ModelConflict`` (for
  their current generation) are skipped: the operator keeps the older claim.

The headers given here must already be trust-filtered by the entry point (gated headers only
from a trusted hop, :mod:`kvroute_router.trust`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvroute_api.route_policy import MatchSpec, PoolTarget, RoutePolicy, RoutePolicySpec

NAMESPACE_HEADER = "x-kvroute-namespace"
"""Trust-gated: the namespace a request is resolved in, set by the trusted hop."""


class PolicyConflictError(Exception):
    """Two policies (or directly reachable pools) claim one model name in one caller scope."""

    def __init__(self, model: str, first: str, second: str, what: str = "RoutePolicies") -> None:
        super().__init__(
            f"The model '{model}' is claimed by two {what}, '{first}' and '{second}', with the "
            f"same specificity; kvroute does not choose between them: give one of them "
            f"spec.match.headers, rename its model, or delete it")
        self.model = model
        self.claimants = (first, second)


@dataclass(frozen=True)
class PoolView:
    """What resolution needs of a pool: its key, namespace, served name and opt-in."""

    key: str
    namespace: str
    name: str
    model_name: str
    direct_access: bool


def namespace_of(policy: RoutePolicy) -> str:
    return policy.metadata.namespace or "default"


def rejected_by_operator(policy: RoutePolicy) -> bool:
    """The operator marked the policy ``Accepted=False/ModelConflict`` for its current spec."""
    if policy.status is None:
        return False
    generation = policy.metadata.generation
    for condition in policy.status.conditions:
        if (condition.type == "Accepted" and condition.status == "False"
                and condition.reason == "ModelConflict"):
            return (condition.observed_generation is None or generation is None
                    or condition.observed_generation == generation)
    return False


def policy_pools(policy: RoutePolicy) -> list[str]:
    """Keys (``namespace/name``) of the pools ``policy`` targets (primary or fallback)."""
    return [f"{namespace_of(policy)}/{t.name}" for t in policy.spec.pools]


def targeted_pools(policies: Iterable[RoutePolicy]) -> frozenset[str]:
    """Keys (``namespace/name``) of the pools any policy targets (primary or fallback)."""
    return frozenset(key for p in policies for key in policy_pools(p))


def directly_reachable(pools: Iterable[PoolView], targeted: frozenset[str]) -> list[PoolView]:
    return [p for p in pools if p.direct_access or p.key not in targeted]


def pick_policy(model: str, headers: Mapping[str, str], policies: Mapping[str, RoutePolicy],
                scope: str | None) -> tuple[str, RoutePolicy] | None:
    """The policy for ``model`` in ``scope`` (None: every namespace), or None."""
    best: list[tuple[str, RoutePolicy]] = []
    best_rank = -1
    for key, policy in policies.items():
        match = policy.spec.match
        if match.model != model:
            continue
        if scope is not None and namespace_of(policy) != scope:
            continue
        if rejected_by_operator(policy):
            continue
        if any(headers.get(h.name) != h.value for h in match.headers):
            continue
        rank = len(match.headers)
        if rank > best_rank:
            best, best_rank = [(key, policy)], rank
        elif rank == best_rank:
            best.append((key, policy))
    if not best:
        return None
    if len(best) > 1:
        first, second = sorted(key for key, _ in best)[:2]
        raise PolicyConflictError(model, first, second)
    return best[0]


def pick_direct_pools(model: str, reachable: Iterable[PoolView], scope: str | None
                      ) -> list[PoolView]:
    """The directly reachable pools serving ``model`` in one namespace (a conflict when
    several namespaces serve it and no scope says which)."""
    serving = sorted((p for p in reachable if p.model_name == model
                      and (scope is None or p.namespace == scope)), key=lambda p: p.key)
    namespaces = sorted({p.namespace for p in serving})
    if len(namespaces) > 1:
        first = next(p.key for p in serving if p.namespace == namespaces[0])
        second = next(p.key for p in serving if p.namespace == namespaces[1])
        raise PolicyConflictError(model, first, second, what="InferencePools in two namespaces")
    return serving


def implied_policy(model: str, serving: list[PoolView]) -> RoutePolicy:
    """The default policy over directly reachable pools (one namespace)."""
    return RoutePolicy.model_validate({
        "metadata": {"name": f"implicit-{serving[0].name}", "namespace": serving[0].namespace},
        "spec": RoutePolicySpec(match=MatchSpec(model=model),
                                pools=[PoolTarget(name=p.name) for p in serving]),
    })


def client_models(policies: Mapping[str, RoutePolicy], reachable: Iterable[PoolView],
                  scope: str | None) -> list[str]:
    """Model names a client may use (``/v1/models``): policies' names (in scope, not rejected
    by the operator) and the served names of directly reachable pools."""
    names = {p.spec.match.model for p in policies.values()
             if (scope is None or namespace_of(p) == scope) and not rejected_by_operator(p)}
    names.update(p.model_name for p in reachable if scope is None or p.namespace == scope)
    return sorted(names)


__all__ = ["NAMESPACE_HEADER", "PolicyConflictError", "PoolView", "client_models",
           "directly_reachable", "implied_policy", "pick_direct_pools", "pick_policy",
           "rejected_by_operator", "targeted_pools"]

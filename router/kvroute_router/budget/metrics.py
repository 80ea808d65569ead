"""Prometheus metrics of budgets, admission and batch routing. The operator's budget status
reads these names, so they are stable API: change them only with a migration note in
docs/budgets.md."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

SPEND_USD_TOTAL = "kvroute_budget_spend_usd_total"
TOKENS_TOTAL = "kvroute_budget_tokens_total"
REQUESTS_TOTAL = "kvroute_budget_requests_total"
LIMIT_USD = "kvroute_budget_limit_usd"
WINDOW_SECONDS = "kvroute_budget_window_seconds"
WINDOW_SPEND_USD = "kvroute_budget_window_spend_usd"
EXHAUSTED_TOTAL = "kvroute_budget_exhausted_total"
IN_FLIGHT = "kvroute_budget_in_flight"
ADMISSION_REJECTED_TOTAL = "kvroute_admission_rejected_total"
ADMISSION_SHED_TOTAL = "kvroute_admission_shed_total"
ADMISSION_QUEUE_DEPTH = "kvroute_admission_queue_depth"
ADMISSION_RELEASED_TOTAL = "kvroute_admission_released_total"
STORE_ERRORS_TOTAL = "kvroute_budget_store_errors_total"
BATCH_SOLVE_SECONDS = "kvroute_batch_solve_seconds"
BATCH_SIZE = "kvroute_batch_size"

NAMESPACE_LABEL = "policy_namespace"
"""The RoutePolicy's namespace. Not ``namespace``: Prometheus' Kubernetes discovery (and the
chart's ServiceMonitor) attach ``namespace`` = the router pod's namespace as a target label,
which would rename an exported ``namespace`` label to ``exported_namespace``."""


def policy_id(policy: str) -> str:
    """The ledger's identifier of a policy: ``namespace/name`` (the datastore's key); a bare
    name means ``default/name`` (config files, library use)."""
    return policy if "/" in policy else f"default/{policy}"


def policy_labels(policy: str) -> tuple[str, str]:
    """(policy_namespace, policy) label values of a policy identifier (``namespace/name`` or a
    bare name, which is in ``default``)."""
    namespace, _, name = policy_id(policy).partition("/")
    return namespace, name


class BudgetMetrics:
    """All budget, admission and batching metrics, registered in one registry (the default
    one in the router; a fresh ``CollectorRegistry`` in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        target = registry if registry is not None else REGISTRY
        policy = [NAMESPACE_LABEL, "policy"]
        budget = [*policy, "budget", "tenant"]
        self.spend_usd = Counter(
            SPEND_USD_TOTAL.removesuffix("_total"),
            "USD charged to a budget (settled with actual token counts).", budget,
            registry=target)
        self.tokens = Counter(
            TOKENS_TOTAL.removesuffix("_total"),
            "Tokens charged to a budget, by kind (prompt | output).", [*budget, "kind"],
            registry=target)
        self.requests = Counter(
            REQUESTS_TOTAL.removesuffix("_total"),
            "Requests checked against a budget, by outcome (admitted | downgraded | rejected | "
            "shed | unmetered: the budget store failed and the policy fails open).",
            [*budget, "outcome"],
            registry=target)
        self.limit_usd = Gauge(LIMIT_USD, "USD limit of a budget per window (this replica's "
                               "share when no shared store is configured).", budget,
            registry=target)
        self.window_seconds = Gauge(WINDOW_SECONDS, "Length of a budget's USD window.",
                                    [*policy, "budget"],
            registry=target)
        self.window_spend_usd = Gauge(
            WINDOW_SPEND_USD, "USD spent in the budget's current sliding window (as seen by "
            "this replica's store).", budget,
            registry=target)
        self.exhausted = Counter(
            EXHAUSTED_TOTAL.removesuffix("_total"),
            "Requests that found a budget limit exhausted, by limit "
            "(usd | tokens_per_minute | requests_per_minute | max_concurrency).",
            [*budget, "limit"],
            registry=target)
        self.in_flight = Gauge(
            IN_FLIGHT, "Requests admitted under a budget and not yet finished (this replica; "
            "sum over replicas).", budget,
            registry=target)
        self.store_errors = Counter(
            STORE_ERRORS_TOTAL.removesuffix("_total"),
            "Budget store (Redis) calls that failed or timed out, by operation (reserve | "
            "settle | release | read) and the policy's choice (FailOpen | FailClosed; "
            "'release' is retried).", [*policy, "operation", "on_error"],
            registry=target)
        self.admission_rejected = Counter(
            ADMISSION_REJECTED_TOTAL.removesuffix("_total"),
            "Requests refused by admission control, by reason (queue_full | queue_timeout | "
            "cancelled: the client left while queued).", [*policy, "reason"],
            registry=target)
        self.admission_shed = Counter(
            ADMISSION_SHED_TOTAL.removesuffix("_total"),
            "Sheddable requests dropped under saturation, by priority class.",
            [*policy, "priority"],
            registry=target)
        self.admission_released = Counter(
            ADMISSION_RELEASED_TOTAL.removesuffix("_total"),
            "Requests that waited in the admission queue and were let go, by the order the "
            "queue went in (arrival: first come first served | newest_first: "
            "spec.admission.newestFirstAfterMs).", [*policy, "order"],
            registry=target)
        self.queue_depth = Gauge(ADMISSION_QUEUE_DEPTH,
                                 "Requests waiting in the router's admission queue.",
                                 policy,
            registry=target)
        self.batch_solve_seconds = Histogram(
            BATCH_SOLVE_SECONDS, "Time to assign one batch to pools.", policy,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=target)
        self.batch_size = Histogram(
            BATCH_SIZE, "Requests assigned together in one batch.", policy,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
            registry=target)

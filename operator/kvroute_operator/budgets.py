"""Pure computation of a RoutePolicy's budget status from measured usage: per budget the spend
against its USD limit, the token rate against tokensPerMinute, the admitted request rate against
requestsPerMinute and the requests in flight against maxConcurrency; the highest percentage of
any of them (``percentUsed``; BudgetStatus has dedicated fields for the USD limit only), and
the BudgetExhausted condition."""

from __future__ import annotations

import math
from collections.abc import Mapping

from kvroute_api.route_policy import BudgetSpec, BudgetStatus

from kvroute_operator.conditions import ConditionUpdate
from kvroute_operator.prometheus import BudgetUsage


def budget_status(budget: BudgetSpec, usage: BudgetUsage) -> BudgetStatus:
    """One entry of ``status.budgets``."""
    shares = []
    if budget.usd is not None and usage.spent_usd is not None:
        shares.append(usage.spent_usd / budget.usd)
    if budget.tokens_per_minute is not None and usage.tokens_per_minute is not None:
        shares.append(usage.tokens_per_minute / budget.tokens_per_minute)
    if budget.requests_per_minute is not None and usage.requests_per_minute is not None:
        shares.append(usage.requests_per_minute / budget.requests_per_minute)
    if budget.max_concurrency is not None and usage.in_flight is not None:
        shares.append(usage.in_flight / budget.max_concurrency)
    percent = math.floor(max(shares, default=0.0) * 100)
    tenant = budget.tenant if budget.tenant != "*" or usage.tenant is None else usage.tenant
    return BudgetStatus(
        name=budget.name, tenant=tenant,
        spent_usd=round(usage.spent_usd, 4) if usage.spent_usd is not None else None,
        limit_usd=budget.usd, window=budget.window, percent_used=max(percent, 0))


def exhausted_condition(statuses: list[BudgetStatus]) -> ConditionUpdate:
    exhausted = [s for s in statuses if s.percent_used >= 100]
    if exhausted:
        names = ", ".join(f"{s.name} (tenant {s.tenant}, {s.percent_used}%)" for s in exhausted)
        return ConditionUpdate("BudgetExhausted", "True", "BudgetExhausted",
                               f"exhausted: {names}; the routers apply each budget's "
                               "onExhausted action")
    if not statuses:
        return ConditionUpdate("BudgetExhausted", "False", "NoBudgets",
                               "the policy defines no budgets")
    worst = max(statuses, key=lambda s: s.percent_used)
    return ConditionUpdate("BudgetExhausted", "False", "WithinBudget",
                           f"highest usage: {worst.name} at {worst.percent_used}%")


def policy_budget_status(budgets: list[BudgetSpec],
                         usage: Mapping[str, BudgetUsage]) -> tuple[list[BudgetStatus], int,
                                                                    ConditionUpdate]:
    """(status.budgets, status.budgetUsedPercent, BudgetExhausted condition)."""
    statuses = [budget_status(b, usage[b.name]) for b in budgets if b.name in usage]
    used = max((s.percent_used for s in statuses), default=0)
    return statuses, used, exhausted_condition(statuses)

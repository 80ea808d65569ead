"""Batch assignment: the MILP is optimal (checked by brute force), holds the budget and
capacity, and falls back to the per-request rule for one request."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from kvroute_router.batching.assignment import (
    AssignmentProblem,
    PoolCapacity,
    assign_single,
    robust_quality,
    solve_batch,
)


def _brute_force(problem: AssignmentProblem) -> float:
    n, m = problem.quality.shape
    best = -1.0
    for choice in itertools.product(range(m), repeat=n):
        rows = np.arange(n)
        cost = problem.cost[rows, choice].sum()
        if problem.budget_usd is not None and cost > problem.budget_usd + 1e-9:
            continue
        counts = np.bincount(choice, minlength=m)
        if any(c.free_sequences is not None and counts[j] > c.free_sequences
               for j, c in enumerate(problem.capacities)):
            continue
        best = max(best, float(problem.quality[rows, choice].sum()))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force_and_holds_constraints(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = 5, 3
    quality = rng.random((n, m))
    cost = rng.random((n, m)) * np.asarray([1.0, 2.0, 4.0])
    problem = AssignmentProblem(
        quality=quality, cost=cost, budget_usd=float(cost[:, 0].sum() + rng.random() * 4),
        capacities=[PoolCapacity(), PoolCapacity(free_sequences=2), PoolCapacity(1)])
    result = solve_batch(problem)
    assert (result.pools >= 0).all()
    assert result.total_cost <= problem.budget_usd + 1e-9  # type: ignore[operator]
    counts = np.bincount(result.pools, minlength=m)
    assert counts[1] <= 2 and counts[2] <= 1
    assert result.total_quality == pytest.approx(_brute_force(problem), abs=1e-6)


def test_unaffordable_requests_are_left_unserved() -> None:
    quality = np.asarray([[0.5, 0.9]] * 4)
    cost = np.asarray([[1.0, 3.0]] * 4)
    result = solve_batch(AssignmentProblem(quality=quality, cost=cost, budget_usd=2.5))
    assert sorted(result.pools.tolist()) == [-1, -1, 0, 0]
    assert result.total_cost == pytest.approx(2.0)
    assert result.notes


def test_capacity_limits_the_strong_pool() -> None:
    quality = np.asarray([[0.1, 0.9]] * 6)
    cost = np.zeros((6, 2))
    result = solve_batch(AssignmentProblem(
        quality=quality, cost=cost, budget_usd=None,
        capacities=[PoolCapacity(), PoolCapacity(free_sequences=2)]))
    assert int((result.pools == 1).sum()) == 2


def test_token_capacity() -> None:
    quality = np.asarray([[0.1, 0.9]] * 3)
    result = solve_batch(AssignmentProblem(
        quality=quality, cost=np.zeros((3, 2)), budget_usd=None,
        capacities=[PoolCapacity(), PoolCapacity(free_tokens=250.0)],
        tokens=np.asarray([100.0, 200.0, 100.0])))
    strong_rows = np.flatnonzero(result.pools == 1)
    assert sum([100.0, 200.0, 100.0][i] for i in strong_rows) <= 250.0
    assert len(strong_rows) == 2


def test_single_request_uses_the_per_request_rule_with_the_same_budget() -> None:
    problem = AssignmentProblem(quality=np.asarray([[0.6, 0.8, 0.9]]),
                                cost=np.asarray([[1.0, 2.0, 5.0]]), budget_usd=2.5)
    result = solve_batch(problem)
    assert result.method == "per-request"
    assert result.pools.tolist() == [1]
    assert assign_single(problem).pools.tolist() == [1]


def test_equal_quality_prefers_the_cheaper_pool() -> None:
    result = solve_batch(AssignmentProblem(quality=np.asarray([[0.7, 0.7]] * 3),
                                           cost=np.asarray([[1.0, 2.0]] * 3), budget_usd=100))
    assert result.pools.tolist() == [0, 0, 0]


def test_robust_quality_discounts_uncertain_upgrades_only() -> None:
    mean = np.asarray([[0.5, 0.8], [0.5, 0.8]])
    std = np.asarray([[0.01, 0.01], [0.2, 0.2]])
    robust = robust_quality(mean, std, kappa=1.0, baseline=0)
    assert robust[:, 0].tolist() == [0.5, 0.5]
    assert robust[0, 1] > robust[1, 1]
    with pytest.raises(ValueError, match="kappa"):
        robust_quality(mean, std, kappa=-1)


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        AssignmentProblem(quality=np.zeros((2, 2)), cost=np.zeros((2, 3)), budget_usd=1)

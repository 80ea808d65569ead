"""Batch-level assignment of requests to pools: maximise the summed predicted quality subject to
the batch's share of the cost budget and each pool's free capacity.

The problem, for requests i and pools j, with x_ij ∈ {0, 1}::

    maximise    Σ q_ij x_ij                      (q = predicted P(good); robust: mu - kappasigma)
    subject to  Σ_j x_ij = 1                     every request gets one pool
                Σ c_ij x_ij ≤ budget             the batch's share of the USD budget
                Σ_i x_ij ≤ free_sequences_j      pool j's free concurrent sequences
                Σ_i t_i x_ij ≤ free_tokens_j     pool j's free token throughput (optional)

It is solved as a MILP with HiGHS (``scipy.optimize.milp``). When no assignment serves every
request (the budget cannot even pay for the cheapest pool, or capacity is short), a first solve
finds the most requests that can be served and a second maximises quality among them; the rest
are returned unassigned (the caller answers 429). A batch of one request skips the solver and
applies the per-request rule — the best pool that fits the same budget and capacity — which is
the MILP's optimum for n = 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix, vstack

FloatArray = npt.NDArray[np.float64]

# Among assignments of equal quality, prefer the cheaper one: a cost tie-break this small never
# outweighs a real quality difference (qualities are probabilities in [0, 1]).
_COST_TIE_BREAK = 1e-6


@dataclass(frozen=True)
class PoolCapacity:
    """What a pool can still take in this batch; None means unlimited."""

    free_sequences: int | None = None
    free_tokens: float | None = None


@dataclass(frozen=True)
class AssignmentProblem:
    """One batch: quality and cost matrices (requests x pools), the budget and capacities."""

    quality: FloatArray
    cost: FloatArray
    budget_usd: float | None
    capacities: Sequence[PoolCapacity] = ()
    tokens: FloatArray | None = None

    def __post_init__(self) -> None:
        if self.quality.shape != self.cost.shape or self.quality.ndim != 2:
            raise ValueError(f"quality {self.quality.shape} and cost {self.cost.shape} must be "
                             "matrices of the same shape (requests x pools)")
        if self.capacities and len(self.capacities) != self.quality.shape[1]:
            raise ValueError(f"{len(self.capacities)} capacities for "
                             f"{self.quality.shape[1]} pools")
        if self.tokens is not None and self.tokens.shape != (self.quality.shape[0],):
            raise ValueError(f"tokens has shape {self.tokens.shape}, expected "
                             f"({self.quality.shape[0]},)")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must be >= 0, got {self.budget_usd}")


@dataclass(frozen=True)
class Assignment:
    """The solver's answer: pool index per request (-1 = not served), and how it was found."""

    pools: npt.NDArray[np.int64]
    total_cost: float
    total_quality: float
    solve_seconds: float
    method: str
    notes: tuple[str, ...] = field(default_factory=tuple)


def _capacity_of(problem: AssignmentProblem, pool: int) -> PoolCapacity:
    return problem.capacities[pool] if problem.capacities else PoolCapacity()


def assign_single(problem: AssignmentProblem) -> Assignment:
    """Per-request rule for a batch of one: the highest-quality pool whose cost fits the budget
    and which has free capacity; equal quality goes to the cheaper pool."""
    started = time.perf_counter()
    if problem.quality.shape[0] != 1:
        raise ValueError("assign_single takes exactly one request")
    best, best_key = -1, (-np.inf, -np.inf)
    tokens = float(problem.tokens[0]) if problem.tokens is not None else 0.0
    for pool in range(problem.quality.shape[1]):
        cost = float(problem.cost[0, pool])
        capacity = _capacity_of(problem, pool)
        if problem.budget_usd is not None and cost > problem.budget_usd + 1e-12:
            continue
        if capacity.free_sequences is not None and capacity.free_sequences < 1:
            continue
        if capacity.free_tokens is not None and tokens > capacity.free_tokens:
            continue
        key = (float(problem.quality[0, pool]), -cost)
        if key > best_key:
            best, best_key = pool, key
    pools = np.asarray([best], dtype=np.int64)
    return _finish(problem, pools, started, "per-request")


def _finish(problem: AssignmentProblem, pools: npt.NDArray[np.int64], started: float,
            method: str, notes: tuple[str, ...] = ()) -> Assignment:
    served = pools >= 0
    rows = np.flatnonzero(served)
    cost = float(problem.cost[rows, pools[served]].sum()) if rows.size else 0.0
    quality = float(problem.quality[rows, pools[served]].sum()) if rows.size else 0.0
    return Assignment(pools=pools, total_cost=cost, total_quality=quality,
                      solve_seconds=time.perf_counter() - started, method=method, notes=notes)


def _shared_constraints(problem: AssignmentProblem) -> list[LinearConstraint]:
    n, m = problem.quality.shape
    columns = np.arange(n * m)
    constraints: list[LinearConstraint] = []
    if problem.budget_usd is not None:
        constraints.append(LinearConstraint(problem.cost.reshape(1, -1), -np.inf,
                                            problem.budget_usd))
    pool_rows: list[csr_matrix] = []
    pool_limits: list[float] = []
    for pool in range(m):
        capacity = _capacity_of(problem, pool)
        mask = columns % m == pool
        if capacity.free_sequences is not None:
            pool_rows.append(csr_matrix(mask.astype(np.float64).reshape(1, -1)))
            pool_limits.append(float(capacity.free_sequences))
        if capacity.free_tokens is not None:
            if problem.tokens is None:
                raise ValueError("a pool has free_tokens but the problem has no tokens")
            weights = np.where(mask, np.repeat(problem.tokens, m), 0.0)
            pool_rows.append(csr_matrix(weights.reshape(1, -1)))
            pool_limits.append(float(capacity.free_tokens))
    if pool_rows:
        constraints.append(LinearConstraint(vstack(pool_rows), -np.inf, np.asarray(pool_limits)))
    return constraints


def _one_pool_per_request(n: int, m: int) -> csr_matrix:
    rows = np.repeat(np.arange(n), m)
    return csr_matrix(coo_matrix((np.ones(n * m), (rows, np.arange(n * m))), shape=(n, n * m)))


def solve_batch(problem: AssignmentProblem, *, time_limit_s: float = 1.0) -> Assignment:
    """Optimal assignment of the batch (MILP, HiGHS); see the module docstring."""
    n, m = problem.quality.shape
    if n == 0 or m == 0:
        return Assignment(np.full(n, -1, dtype=np.int64), 0.0, 0.0, 0.0, "empty")
    if n == 1:
        return assign_single(problem)
    started = time.perf_counter()
    options = {"time_limit": time_limit_s, "presolve": True, "disp": False}
    shared = _shared_constraints(problem)
    one_each = _one_pool_per_request(n, m)
    scale = float(np.max(problem.cost)) or 1.0
    objective = -(problem.quality - _COST_TIE_BREAK * problem.cost / scale).ravel()
    integrality = np.ones(n * m)
    bounds = Bounds(0.0, 1.0)
    result = milp(objective, constraints=[*shared, LinearConstraint(one_each, 1.0, 1.0)],
                  integrality=integrality, bounds=bounds, options=options)
    notes: tuple[str, ...] = ()
    if result.x is None:
        # Nobody-left-behind is infeasible: serve as many as possible, then the best of those.
        most = milp(-np.ones(n * m), constraints=[*shared, LinearConstraint(one_each, 0.0, 1.0)],
                    integrality=integrality, bounds=bounds, options=options)
        if most.x is None:
            raise RuntimeError(f"batch solver failed: {most.message}")
        served = float(np.round(-most.fun))
        everyone = LinearConstraint(np.ones((1, n * m)), served, np.inf)
        result = milp(objective, constraints=[*shared, LinearConstraint(one_each, 0.0, 1.0),
                                              everyone],
                      integrality=integrality, bounds=bounds, options=options)
        if result.x is None:
            raise RuntimeError(f"batch solver failed: {result.message}")
        notes = (f"only {int(served)} of {n} requests fit the budget and capacity",)
    chosen = np.round(result.x).reshape(n, m)
    pools = np.where(chosen.sum(axis=1) > 0.5, chosen.argmax(axis=1), -1).astype(np.int64)
    return _finish(problem, pools, started, "milp", notes)


def robust_quality(mean: FloatArray, std: FloatArray, kappa: float,
                   baseline: int = 0) -> FloatArray:
    """Quality matrix for the robust variant: each pool's predicted advantage over the
    ``baseline`` pool (the cheapest) is taken at its worst case within ``kappa`` standard errors
    of the difference,
    ``q_ij = mu_ib + (mu_ij - mu_ib) - kappa * sqrt(sigma_ij^2 + sigma_ib^2)`` (b = baseline), so
    money is spent on upgrades whose benefit is predicted confidently. The baseline column is
    left at its mean; adding a per-request constant does not change the optimum."""
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    base_std = std[:, [baseline]]
    discounted = mean - kappa * np.sqrt(std ** 2 + base_std ** 2)
    discounted[:, baseline] = mean[:, baseline]
    return discounted

"""Offline evaluation of budgeted routing between a weak and a strong model on labelled prompts
(RouteLLM correctness format): the engine behind ``kvroute eval routing`` and
``bench/routing_eval.py``.

Test prompts are cut into consecutive batches of ``batch_size``; each batch may spend
``budget x len(batch)`` USD (``budget`` is the average cost per request). Methods:

* ``always-weak`` / ``always-strong`` — references (always-strong ignores the budget);
* ``random`` — each prompt goes strong with probability s* = (budget - c_weak) / (c_strong -
  c_weak), the share the budget affords; the batch budget is enforced (a strong call that no
  longer fits is downgraded, as kvroute's ledger would);
* ``per-query-threshold`` — RouteLLM-style: strong when the predicted gain (P_strong - P_weak)
  reaches a threshold calibrated on the training set (leave-one-out predictions) so that a share
  s* of training prompts goes strong. Decides each prompt alone and knows no budget, so it may
  overspend a batch (``max_batch_cost``);
* ``per-query-cutoff`` — the same threshold, with a running cut-off: once the batch's budget
  cannot pay for another strong call, the rest go weak;
* ``kvroute-batch`` — the batch MILP (``assignment.solve_batch``) on predicted quality;
* ``kvroute-robust`` — the same on the robust quality (``assignment.robust_quality``);
* ``oracle`` — the batch MILP on the true labels under the same budget (an upper bound).

Outside ``METHODS`` (for the benchmark's docs and plot only), ``budget_safe_threshold`` is a
per-query threshold raised until no *training* batch in the same order would have overspent,
scored by ``evaluate_threshold``.

Predictions come from one estimator fitted on the training rows (``prepare``): by default kNN
over all-MiniLM-L6-v2 embeddings with hyper-parameters chosen by leave-one-out on train.

Orders (how test prompts arrive, hence how they fall into batches):

* ``random`` shuffles the test set (seeded);
* ``adversarial`` — hard prompts cluster, as in the paper: prompts are sorted by predicted
  *difficulty*, the estimator's P(weak model wrong) = 1 - P_weak, hardest first, with ties broken
  by the seeded shuffle. Whole batches then hold prompts the weak model is likely to fail, and
  later batches only easy ones. Difficulty is not the routing signal (the predicted *benefit*
  P_strong - P_weak is): inside a hard batch benefits still differ (some hard prompts are hard for
  the strong model too), so there is something to choose between, while per-query routers face
  the clustering the paper describes — without a ledger they overspend the hard batches, with a
  running cut-off they spend each hard batch's budget on whichever qualifying prompts arrive first
  and leave the budget of the easy batches (where few prompts pass the threshold) unused;
* ``benefit-sorted`` — the previous definition of ``adversarial``, kept for transparency: sorted
  by predicted benefit of the strong model, highest first. Each batch then holds prompts of
  nearly equal predicted benefit, so any ranking inside a batch is close to random; what it
  stresses is only per-query routers' spending across batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from kvroute_router.batching.assignment import AssignmentProblem, robust_quality, solve_batch
from kvroute_router.batching.quality import (
    KnnQualityEstimator,
    LabelledPrompt,
    MiniLmEmbedder,
    QualityEstimate,
    TuningResult,
    benefit_auc,
    make_embedder,
)
from kvroute_router.budget.pricing import Tier

from kvroute_cli.evaluation.estimators import BlendedQualityEstimator, LogisticQualityEstimator

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Order = Literal["random", "adversarial", "benefit-sorted"]
ORDERS: tuple[Order, ...] = ("random", "adversarial", "benefit-sorted")

METHODS: tuple[str, ...] = ("always-weak", "always-strong", "random", "per-query-threshold",
                            "per-query-cutoff", "kvroute-batch", "kvroute-robust", "oracle")
TIERS: tuple[Tier, ...] = ("weak", "strong")


@dataclass(frozen=True)
class EvalConfig:
    """Parameters of one evaluation run."""

    cost_weak: float
    cost_strong: float
    budget: float
    batch_size: int
    order: Order = "random"
    seed: int = 0
    robust_kappa: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.cost_weak < self.cost_strong:
            raise ValueError(f"need 0 <= cost-weak < cost-strong, got {self.cost_weak} and "
                             f"{self.cost_strong}")
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0 (average USD per request), got {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")

    @property
    def strong_share(self) -> float:
        """Share of strong calls the budget affords on average."""
        share = (self.budget - self.cost_weak) / (self.cost_strong - self.cost_weak)
        return float(min(1.0, max(0.0, share)))


@dataclass(frozen=True)
class MethodResult:
    """Outcome of one method; costs are per request."""

    accuracy: float
    mean_cost: float
    max_batch_cost: float
    strong_share: float

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "mean_cost": self.mean_cost,
                "max_batch_cost": self.max_batch_cost, "strong_share": self.strong_share}


@dataclass
class EvalReport:
    """Results of every method, plus solver timing."""

    config: EvalConfig
    methods: dict[str, MethodResult]
    test_rows: int
    batches: int
    solver_seconds: dict[str, list[float]] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"budget": self.config.budget, "batch_size": self.config.batch_size,
                "order": self.config.order,
                "methods": {name: result.as_dict() for name, result in self.methods.items()}}


@dataclass(frozen=True)
class PreparedData:
    """Test labels and predictions, and the training predictions used for calibration."""

    weak_correct: IntArray
    strong_correct: IntArray
    test: QualityEstimate
    train_gain: FloatArray
    train_weak: FloatArray | None = None
    estimator: str = ""
    tuning: TuningResult | None = None


ESTIMATORS: tuple[str, ...] = ("auto", "minilm", "hashed", "logistic", "blend")


def prepare(train: Sequence[LabelledPrompt], test: Sequence[LabelledPrompt], *,
            k: int | None = None, estimator: str = "auto") -> PreparedData:
    """Fit the quality estimator on ``train``, predict ``test``, and predict ``train`` held out
    (leave-one-out for kNN, cross-fitted for the logistic model) for the per-query threshold.
    Every method that uses predictions, per-query and batch alike, uses these same ones.

    Estimators: ``minilm`` — kNN over all-MiniLM-L6-v2 embeddings (NumPy), with k, similarity
    power and prior strength tuned by leave-one-out on train (``k`` pins k); ``hashed`` — the
    same kNN over hashed word n-gram TF-IDF; ``auto`` (default) — ``minilm`` when the model
    package is installed, else ``hashed``; ``logistic`` and ``blend`` (kNN + logistic) over
    hashed TF-IDF. docs/budgets.md has their measured ranking quality."""
    fitted: KnnQualityEstimator | LogisticQualityEstimator | BlendedQualityEstimator
    name = estimator
    if estimator in ("auto", "minilm", "hashed"):
        embedder, name = make_embedder(estimator)
        if isinstance(embedder, MiniLmEmbedder):
            # One bulk call over every prompt: its disk-cache key is the same for any split.
            embedder.embed([row.prompt for row in (*train, *test)])
        fitted = KnnQualityEstimator.tuned(train, embedder=embedder, fixed_k=k)
    elif estimator == "blend":
        fitted = BlendedQualityEstimator(train, k=k or 32)
    elif estimator == "logistic":
        fitted = LogisticQualityEstimator(train)
    else:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    predicted = fitted.predict([row.prompt for row in test], TIERS)
    held_out = fitted.predict_training_held_out(TIERS)
    return PreparedData(
        weak_correct=np.asarray([row.weak_correct for row in test], dtype=np.int64),
        strong_correct=np.asarray([row.strong_correct for row in test], dtype=np.int64),
        test=predicted, train_gain=held_out.mean[:, 1] - held_out.mean[:, 0],
        train_weak=held_out.mean[:, 0], estimator=name,
        tuning=fitted.tuning if isinstance(fitted, KnnQualityEstimator) else None)


@dataclass(frozen=True)
class RankingQuality:
    """How well predicted benefit P_strong - P_weak ranks the test prompts: AUC for "weak wrong
    and strong right", Spearman and Pearson correlation with strong_correct - weak_correct."""

    auc: float
    spearman: float
    pearson: float


def ranking_quality(data: PreparedData) -> RankingQuality:
    from scipy.stats import pearsonr, spearmanr

    gain = data.test.mean[:, 1] - data.test.mean[:, 0]
    truth = (data.strong_correct - data.weak_correct).astype(np.float64)
    return RankingQuality(
        auc=benefit_auc(gain, data.weak_correct.astype(np.float64),
                        data.strong_correct.astype(np.float64)),
        spearman=float(spearmanr(gain, truth).statistic),
        pearson=float(pearsonr(gain, truth).statistic))


def batch_order(predicted_weak: FloatArray, predicted_gain: FloatArray, order: Order,
                seed: int) -> IntArray:
    """Test row indices in arrival order (see the module docstring). ``adversarial`` sorts by
    predicted difficulty 1 - P_weak, hardest first; ``benefit-sorted`` by predicted benefit
    P_strong - P_weak, highest first; ties keep the seeded shuffle's order."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(predicted_gain)).astype(np.int64)
    if order == "random":
        return shuffled
    if order == "adversarial":
        key = predicted_weak[shuffled]  # ascending P_weak == descending difficulty
    elif order == "benefit-sorted":
        key = -predicted_gain[shuffled]
    else:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    return shuffled[np.argsort(key, kind="stable")]


def threshold_for_share(train_gain: FloatArray, share: float) -> float:
    """Predicted-gain threshold above which a ``share`` of training prompts go strong."""
    if share <= 0.0:
        return float("inf")
    if share >= 1.0:
        return float("-inf")
    return float(np.quantile(train_gain, 1.0 - share))


def budget_safe_threshold(data: PreparedData, config: EvalConfig) -> float:
    """A per-query threshold that would have kept every *training* batch within budget: the
    training prompts (held-out predictions) arrive in ``config.order`` with ``config.seed``, are
    cut into batches of ``config.batch_size``, and the threshold is raised above the gain of the
    (affordable + 1)-th best prompt of every batch — and never below the affordable-share
    threshold. It is still a per-query rule: on test it may overspend a batch."""
    if data.train_weak is None:
        raise ValueError("budget_safe_threshold needs held-out training predictions of P_weak")
    threshold = threshold_for_share(data.train_gain, config.strong_share)
    order = batch_order(data.train_weak, data.train_gain, config.order, config.seed)
    upgrade = config.cost_strong - config.cost_weak
    for start in range(0, len(order), config.batch_size):
        gains = np.sort(data.train_gain[order[start:start + config.batch_size]])[::-1]
        affordable = int(np.floor((config.budget - config.cost_weak) * len(gains) / upgrade
                                  + 1e-9))
        if 0 <= affordable < len(gains):
            threshold = max(threshold, float(np.nextafter(gains[affordable], np.inf)))
    return threshold


def evaluate_threshold(data: PreparedData, config: EvalConfig, threshold: float) -> MethodResult:
    """A plain per-query threshold rule (no ledger, no cut-off) on the test batches."""
    mean = data.test.mean
    gain = mean[:, 1] - mean[:, 0]
    order = batch_order(mean[:, 0], gain, config.order, config.seed)
    chosen = (gain >= threshold).astype(np.int64)
    cost = np.where(chosen == 1, config.cost_strong, config.cost_weak)
    correct = np.where(chosen == 1, data.strong_correct, data.weak_correct)
    worst = max(float(cost[order[i:i + config.batch_size]].mean())
                for i in range(0, len(order), config.batch_size))
    return MethodResult(accuracy=float(correct.mean()), mean_cost=float(cost.mean()),
                        max_batch_cost=worst, strong_share=float(chosen.mean()))


def _cap_in_order(wants_strong: npt.NDArray[np.bool_], config: EvalConfig) -> IntArray:
    """Running budget cut-off over one batch: strong requests in arrival order while the batch
    budget still pays for them (and for weak calls for everyone after them)."""
    budget = config.budget * len(wants_strong)
    spent = config.cost_weak * len(wants_strong)  # every request costs at least the weak price
    upgrade = config.cost_strong - config.cost_weak
    chosen = np.zeros(len(wants_strong), dtype=np.int64)
    for i, wants in enumerate(wants_strong):
        if wants and spent + upgrade <= budget + 1e-12:
            chosen[i] = 1
            spent += upgrade
    return chosen


def _solve(quality: FloatArray, config: EvalConfig) -> tuple[IntArray, float]:
    n = quality.shape[0]
    cost = np.tile(np.asarray([config.cost_weak, config.cost_strong]), (n, 1))
    result = solve_batch(AssignmentProblem(quality=quality, cost=cost,
                                           budget_usd=config.budget * n))
    # A budget below the weak price leaves requests unserved; score them as weak-served.
    return np.maximum(result.pools, 0), result.solve_seconds


def evaluate(data: PreparedData, config: EvalConfig,
             methods: Sequence[str] = METHODS) -> EvalReport:
    """Run ``methods`` over the test batches; see the module docstring."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; valid: {', '.join(METHODS)}")
    mean, std = data.test.mean, data.test.std
    gain = mean[:, 1] - mean[:, 0]
    order = batch_order(mean[:, 0], gain, config.order, config.seed)
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    rng = np.random.default_rng(config.seed + 1)
    share = config.strong_share
    threshold = threshold_for_share(data.train_gain, share)
    robust = robust_quality(mean, std, config.robust_kappa, baseline=0)
    truth = np.stack([data.weak_correct, data.strong_correct], axis=1).astype(np.float64)
    timings: dict[str, list[float]] = {"kvroute-batch": [], "kvroute-robust": [], "oracle": []}

    def per_batch(name: str) -> Callable[[IntArray], IntArray]:
        def choose(rows: IntArray) -> IntArray:
            n = len(rows)
            if name == "always-weak":
                return np.zeros(n, dtype=np.int64)
            if name == "always-strong":
                return np.ones(n, dtype=np.int64)
            if name == "random":
                return _cap_in_order(rng.random(n) < share, config)
            if name == "per-query-threshold":
                return (gain[rows] >= threshold).astype(np.int64)
            if name == "per-query-cutoff":
                return _cap_in_order(gain[rows] >= threshold, config)
            matrix = {"kvroute-batch": mean, "kvroute-robust": robust, "oracle": truth}[name]
            chosen, seconds = _solve(matrix[rows], config)
            timings[name].append(seconds)
            return chosen
        return choose

    results: dict[str, MethodResult] = {}
    for name in methods:
        choose = per_batch(name)
        correct = 0
        total_cost = 0.0
        strong_calls = 0
        worst = 0.0
        for rows in batches:
            chosen = choose(rows)
            correct += int(np.where(chosen == 1, data.strong_correct[rows],
                                    data.weak_correct[rows]).sum())
            cost = float(np.where(chosen == 1, config.cost_strong, config.cost_weak).sum())
            total_cost += cost
            strong_calls += int(chosen.sum())
            worst = max(worst, cost / len(rows))
        count = len(order)
        results[name] = MethodResult(accuracy=correct / count, mean_cost=total_cost / count,
                                     max_batch_cost=worst, strong_share=strong_calls / count)
    return EvalReport(config=config, methods=results, test_rows=len(order),
                      batches=len(batches),
                      solver_seconds={k: v for k, v in timings.items() if v})

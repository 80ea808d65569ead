"""Quality estimators used only to evaluate budgeted routing offline (``kvroute eval routing``
and ``bench/routing_eval.py``), not by the router: a logistic-regression estimator, a blend of it
with the router's kNN estimator, and the train/test split.

The router's own estimators (kNN, heuristic) are in :mod:`kvroute_router.batching.quality`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from kvroute_router.batching.quality import (
    Embedder,
    HashedNgramEmbedder,
    KnnQualityEstimator,
    LabelledPrompt,
    QualityEstimate,
    tier_columns,
)
from kvroute_router.budget.pricing import Tier

FloatArray = npt.NDArray[np.float64]


def _prompt_shape(prompts: Sequence[str]) -> FloatArray:
    """Dense shape features of each prompt: log length in characters and words, digits, numbers,
    question marks, and whether it lists lettered options (multiple choice)."""
    rows = []
    for prompt in prompts:
        rows.append([math.log1p(len(prompt)), math.log1p(len(prompt.split())),
                     min(sum(ch.isdigit() for ch in prompt), 50) / 50.0,
                     math.log1p(len(_NUMBER.findall(prompt))), prompt.count("?") / 3.0,
                     float("\nA." in prompt or "\nA)" in prompt)])
    return np.asarray(rows, dtype=np.float64).reshape(len(prompts), 6)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)


@dataclass
class _LogisticFit:
    """One L2-regularised logistic regression: weights, bias, and the diagonal of the penalised
    Hessian at the optimum (for a cheap standard error of each prediction)."""

    weights: FloatArray
    bias: float
    hessian_diagonal: FloatArray

    @classmethod
    def fit(cls, features: sp.csr_matrix, labels: FloatArray, l2: float,
            max_iter: int) -> _LogisticFit:
        from scipy.optimize import minimize

        n, d = features.shape
        prior = float(np.clip(labels.mean(), 1e-3, 1 - 1e-3)) if n else 0.5
        start = np.zeros(d + 1)
        start[-1] = math.log(prior / (1.0 - prior))

        def objective(theta: FloatArray) -> tuple[float, FloatArray]:
            z = features @ theta[:-1] + theta[-1]
            loss = float(np.sum(np.logaddexp(0.0, z) - labels * z)
                         + 0.5 * l2 * theta[:-1] @ theta[:-1])
            residual = _sigmoid(z) - labels
            gradient = np.append(features.T @ residual + l2 * theta[:-1], residual.sum())
            return loss, gradient

        result = minimize(objective, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter})
        theta = np.asarray(result.x, dtype=np.float64)
        p = _sigmoid(features @ theta[:-1] + theta[-1])
        curvature = np.asarray(features.multiply(features).T @ (p * (1.0 - p))).ravel()
        return cls(theta[:-1], float(theta[-1]), curvature + l2)

    def predict(self, features: sp.csr_matrix) -> tuple[FloatArray, FloatArray]:
        """P(correct) and its delta-method standard error (diagonal Laplace approximation)."""
        p = _sigmoid(features @ self.weights + self.bias)
        z_var = np.asarray(features.multiply(features) @ (1.0 / self.hessian_diagonal)).ravel()
        return p, p * (1.0 - p) * np.sqrt(z_var)


class LogisticQualityEstimator:
    """Two L2-regularised logistic regressions — P(weak correct) and P(strong correct) — over
    the hashed word n-gram TF-IDF of the prompt plus standardised shape features (length,
    digits, numbers, question marks, multiple-choice options). The predicted benefit of the
    strong model, P(strong) - P(weak), is exactly E[strong_correct - weak_correct] however the
    two are correlated, so two marginal models suffice. ``std`` is the delta-method standard
    error of each probability (diagonal Laplace approximation of the posterior)."""

    def __init__(self, examples: Sequence[LabelledPrompt], *, l2: float = 1.0,
                 max_iter: int = 200, embedder: Embedder | None = None,
                 held_out_folds: int = 2, seed: int = 0) -> None:
        if not examples:
            raise ValueError("LogisticQualityEstimator needs at least one labelled example")
        self.l2, self.max_iter = l2, max_iter
        self.held_out_folds, self.seed = held_out_folds, seed
        self.embedder: Embedder = embedder or HashedNgramEmbedder()
        self._examples = list(examples)
        prompts = [e.prompt for e in self._examples]
        self.embedder.fit(prompts)
        shape = _prompt_shape(prompts)
        self._shape_mean = shape.mean(axis=0)
        self._shape_scale = shape.std(axis=0) + 1e-9
        features = self._features(prompts)
        self._weak = np.asarray([e.weak_correct for e in self._examples], dtype=np.float64)
        self._strong = np.asarray([e.strong_correct for e in self._examples], dtype=np.float64)
        self._fits = (_LogisticFit.fit(features, self._weak, l2, max_iter),
                      _LogisticFit.fit(features, self._strong, l2, max_iter))

    def _features(self, prompts: Sequence[str]) -> sp.csr_matrix:
        text = sp.csr_matrix(self.embedder.embed(prompts))
        shape = (_prompt_shape(prompts) - self._shape_mean) / self._shape_scale
        return sp.csr_matrix(sp.hstack([text, sp.csr_matrix(shape)]))

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        features = self._features(prompts)
        (wm, ws), (sm, ss) = (fit.predict(features) for fit in self._fits)
        return QualityEstimate(tuple(tiers), tier_columns(wm, sm, tiers),
                               tier_columns(ws, ss, tiers))

    def predict_training_held_out(self, tiers: Sequence[Tier]) -> QualityEstimate:
        """Cross-fitted predictions for the training prompts (``held_out_folds`` folds, each
        predicted by models fitted without it), for calibrating thresholds on train."""
        n = len(self._examples)
        prompts = [e.prompt for e in self._examples]
        features = self._features(prompts)
        folds = np.random.default_rng(self.seed).permutation(n) % max(2, self.held_out_folds)
        mean = np.empty((n, 2))
        std = np.empty((n, 2))
        for fold in np.unique(folds):
            inside, outside = folds != fold, folds == fold
            for column, labels in enumerate((self._weak, self._strong)):
                fit = _LogisticFit.fit(features[inside], labels[inside], self.l2, self.max_iter)
                mean[outside, column], std[outside, column] = fit.predict(features[outside])
        return QualityEstimate(tuple(tiers), tier_columns(mean[:, 0], mean[:, 1], tiers),
                               tier_columns(std[:, 0], std[:, 1], tiers))


class BlendedQualityEstimator:
    """The default with labelled data: the average of ``LogisticQualityEstimator`` (global,
    smooth in the features) and ``KnnQualityEstimator`` (local) sharing one fitted embedding,
    ``mean = w·knn + (1 - w)·logistic``; ``std`` combines both standard errors the same way
    plus their disagreement, so the robust solver distrusts prompts the two models dispute."""

    def __init__(self, examples: Sequence[LabelledPrompt], *, knn_weight: float = 0.5,
                 k: int = 32, l2: float = 1.0, embedder: Embedder | None = None,
                 seed: int = 0) -> None:
        if not 0.0 <= knn_weight <= 1.0:
            raise ValueError(f"knn_weight must be in [0, 1], got {knn_weight}")
        self.knn_weight = knn_weight
        shared = embedder or HashedNgramEmbedder()
        self.logistic = LogisticQualityEstimator(examples, l2=l2, embedder=shared, seed=seed)
        self.knn = KnnQualityEstimator(examples, k=k, embedder=_Fitted(shared))

    def _combine(self, knn: QualityEstimate, logistic: QualityEstimate) -> QualityEstimate:
        w = self.knn_weight
        mean = w * knn.mean + (1.0 - w) * logistic.mean
        spread = np.sqrt((w * knn.std) ** 2 + ((1.0 - w) * logistic.std) ** 2
                         + w * (1.0 - w) * (knn.mean - logistic.mean) ** 2)
        return QualityEstimate(knn.tiers, mean, spread)

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        return self._combine(self.knn.predict(prompts, tiers),
                             self.logistic.predict(prompts, tiers))

    def predict_training_held_out(self, tiers: Sequence[Tier]) -> QualityEstimate:
        return self._combine(self.knn.predict_training_held_out(tiers),
                             self.logistic.predict_training_held_out(tiers))


class _Fitted:
    """An already fitted embedder whose ``fit`` is a no-op (so two estimators share one)."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner

    def fit(self, prompts: Sequence[str]) -> None:
        """Already fitted."""

    def embed(self, prompts: Sequence[str]) -> sp.csr_matrix | FloatArray:
        return self._inner.embed(prompts)


def split_examples(examples: Iterable[LabelledPrompt], *, test_fraction: float,
                   seed: int) -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    """Shuffle with ``seed`` and split into (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    items = list(examples)
    order = np.random.default_rng(seed).permutation(len(items))
    cut = round(len(items) * (1.0 - test_fraction))
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]

"""Difficulty routing: hard prompts to the strong tier, easy ones to the cheap tier, so that
about ``strongShare`` of a policy's requests go strong.

Tiers: among the policy's primary pools, the **strong tier** is the pools of highest quality —
``spec.quality.score`` when set, else the tier (weak 0.25, standard 0.5, strong 0.75) — and the
**cheap tier** the others. All primaries of equal quality: nothing to choose, no preference.

Per request, the estimator named by ``spec.difficulty.estimator`` predicts the gain of the
strong tier over the weak one, P(strong answers well) - P(weak answers well):

* ``heuristic`` — prompt length, digits and keywords (``HeuristicQualityEstimator``); needs no
  data;
* ``knn-hashed`` — kNN over the router's labelled data (``--quality-data``) with hashed TF-IDF;
* ``knn-minilm`` — the same kNN over all-MiniLM-L6-v2 embeddings (NumPy; built in a thread
  behind the hashed one, which answers meanwhile).

The kNN estimators need ``--quality-data``; without it the heuristic answers (logged once).

**Per request** (``spec.batching.enabled: false`` or ``windowMs: 0``): the request goes strong
when its gain is in the top ``strongShare`` of the gains of the policy's last :data:`WINDOW`
requests (itself included), so the strong share follows ``strongShare`` whatever the
estimator's scale and the traffic's mix. **Batch-level** (batching on): requests arriving within
``windowMs`` (at most ``maxBatchSize``) are scored in one estimator call and the
``strongShare x n`` of highest gain go strong (the fractional remainder carried to the next
batch, so the long-run share is exact); the request waits at most ``windowMs``. The choice is a
*preference* (an :class:`Admission` with ``prefer``): when a budget restricts the request to a
pool (batch-level assignment under a USD budget, or a Downgrade), the budget's pool wins, and a
tier without ready endpoints falls back to the other. With batching on and a USD budget, the
batch solver already assigns whole windows by the same estimator's quality; the preference
then orders the pools the budget leaves open.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from pathlib import Path

from kvroute_api.inference_pool import InferencePoolSpec
from kvroute_api.route_policy import DifficultySpec
from prometheus_client import CollectorRegistry, Counter

from kvroute_router.batching.quality import (
    HashedNgramEmbedder,
    HeuristicQualityEstimator,
    KnnQualityEstimator,
    QualityEstimator,
    build_default_estimator,
    load_labelled_csv,
)
from kvroute_router.datastore.store import Datastore, Resolution
from kvroute_router.framework.lifecycle import Admission
from kvroute_router.framework.request import LLMRequest

log = logging.getLogger(__name__)

WINDOW = 512
TIER_QUALITY = {"weak": 0.25, "standard": 0.5, "strong": 0.75}


def pool_quality(spec: InferencePoolSpec) -> float:
    """The quality a pool is ranked by: its measured score, else its tier's value."""
    if spec.quality.score is not None:
        return spec.quality.score
    return TIER_QUALITY[spec.quality.tier]


class DifficultyRouter:
    """The director's admission hook for ``spec.difficulty``."""

    def __init__(self, datastore: Datastore, registry: CollectorRegistry, *,
                 quality_data: Path | None = None) -> None:
        self.datastore = datastore
        self.quality_data = quality_data
        self._estimators: dict[str, QualityEstimator] = {}
        self._gains: dict[str, deque[float]] = {}
        self._batches: dict[str, _Batch] = {}
        self._carry: dict[str, float] = {}
        self.decisions = Counter(
            "kvroute_difficulty_decisions_total",
            "Difficulty routing: requests preferred to the strong or the cheap tier.",
            ["policy", "tier", "estimator"], registry=registry)

    def estimator(self, name: str) -> tuple[QualityEstimator, str]:
        """The estimator for ``name`` and the name actually used (heuristic without data)."""
        if name != "heuristic" and self.quality_data is None:
            if "heuristic-fallback" not in self._estimators:
                log.warning("difficulty estimator %s needs the router's --quality-data; using "
                            "the heuristic", name)
                self._estimators["heuristic-fallback"] = HeuristicQualityEstimator()
            return self._estimators["heuristic-fallback"], "heuristic"
        if name not in self._estimators:
            if name == "heuristic":
                self._estimators[name] = HeuristicQualityEstimator()
            elif name == "knn-hashed":
                assert self.quality_data is not None
                self._estimators[name] = KnnQualityEstimator.tuned(
                    load_labelled_csv(self.quality_data), embedder=HashedNgramEmbedder())
            else:
                self._estimators[name] = build_default_estimator(
                    self.quality_data, embedding="minilm", background=True)
        return self._estimators[name], name

    def tiers(self, resolution: Resolution) -> tuple[list[str], list[str]]:
        """(strong, cheap) pool names among the policy's primary pools."""
        ranked = [(pool_quality(state.pool.spec), target.name)
                  for state, target in resolution.pools
                  if state is not None and target.role == "primary" and target.weight > 0]
        if not ranked:
            return [], []
        best = max(q for q, _ in ranked)
        return ([n for q, n in ranked if q == best], [n for q, n in ranked if q < best])

    def choose(self, policy_key: str, gain: float, strong_share: float) -> bool:
        """Whether a request with ``gain`` goes strong (quantile of the recent gains)."""
        window = self._gains.setdefault(policy_key, deque(maxlen=WINDOW))
        window.append(gain)
        if strong_share <= 0.0:
            return False
        if strong_share >= 1.0:
            return True
        ordered = sorted(window)
        # Gains strictly above this one: the request goes strong if fewer than
        # strong_share of the window lies above it.
        above = len(ordered) - bisect.bisect_right(ordered, gain)
        return above < strong_share * len(ordered)

    async def admit(self, request: LLMRequest, resolution: Resolution) -> Admission | None:
        spec: DifficultySpec | None = resolution.policy.spec.difficulty
        if spec is None or not spec.enabled or resolution.implicit:
            return None
        strong, cheap = self.tiers(resolution)
        if not strong or not cheap:
            return None
        estimator, used = self.estimator(spec.estimator)
        batching = resolution.policy.spec.batching
        if batching.enabled and batching.window_ms > 0:
            goes_strong = await self._in_batch(resolution.policy_key, request.prompt_text,
                                               estimator, spec.strong_share,
                                               batching.window_ms / 1000.0,
                                               batching.max_batch_size)
        else:
            estimate = await asyncio.to_thread(estimator.predict, [request.prompt_text],
                                               ("weak", "strong"))
            gain = float(estimate.mean[0, 1] - estimate.mean[0, 0])
            goes_strong = self.choose(resolution.policy_key, gain, spec.strong_share)
        self.decisions.labels(resolution.policy.metadata.name,
                              "strong" if goes_strong else "cheap", used).inc()
        return Admission(prefer=strong if goes_strong else cheap)

    async def _in_batch(self, key: str, prompt: str, estimator: QualityEstimator,
                        strong_share: float, window_s: float, max_size: int) -> bool:
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch()
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(window_s, self._close, key, batch, estimator,
                                          strong_share)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        batch.entries.append((prompt, future))
        if len(batch.entries) >= max_size:
            self._close(key, batch, estimator, strong_share)
        return await future

    def _close(self, key: str, batch: _Batch, estimator: QualityEstimator,
               strong_share: float) -> None:
        if self._batches.get(key) is batch:
            del self._batches[key]
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.closed:
            return
        batch.closed = True
        task = asyncio.get_running_loop().create_task(
            self._decide(key, batch, estimator, strong_share))
        batch.task = task

    async def _decide(self, key: str, batch: _Batch, estimator: QualityEstimator,
                      strong_share: float) -> None:
        prompts = [p for p, _ in batch.entries]
        try:
            estimate = await asyncio.to_thread(estimator.predict, prompts, ("weak", "strong"))
        except Exception as exc:  # never strand the waiting requests
            for _, future in batch.entries:
                if not future.done():
                    future.set_exception(exc)
            return
        gains = estimate.mean[:, 1] - estimate.mean[:, 0]
        wanted = strong_share * len(prompts) + self._carry.get(key, 0.0)
        count = min(len(prompts), int(wanted))
        self._carry[key] = wanted - count
        strong = set(sorted(range(len(prompts)), key=lambda i: -float(gains[i]))[:count])
        for i, (_, future) in enumerate(batch.entries):
            if not future.done():
                future.set_result(i in strong)


class _Batch:
    def __init__(self) -> None:
        self.entries: list[tuple[str, asyncio.Future[bool]]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False


__all__ = ["DifficultyRouter", "pool_quality"]

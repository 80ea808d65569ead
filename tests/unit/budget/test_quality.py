"""Quality estimators and the labelled-CSV loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from kvroute_router.budget.quality import (
    BlendedQualityEstimator,
    HashedNgramEmbedder,
    HeuristicQualityEstimator,
    KnnQualityEstimator,
    LabelledPrompt,
    LogisticQualityEstimator,
    build_default_estimator,
    load_labelled_csv,
    split_examples,
)

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

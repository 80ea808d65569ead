"""Difficulty routing: about strongShare of the requests prefer the strong tier (the pools of
highest quality.score, else tier), hard prompts more than easy ones, with or without budgets."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import pytest
from kvroute_router.admission.hook import BudgetHook
from kvroute_router.batching.quality import HeuristicQualityEstimator
from kvroute_router.difficulty import DifficultyRouter
from kvroute_router.framework.request import LLMRequest
from prometheus_client import CollectorRegistry

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "routellm" / \
    "correctness.csv.gz"


def prompts(count: int) -> list[str]:
    if not DATA.is_file():
        pytest.skip(f"{DATA} is not present")
    with gzip.open(DATA, "rt", encoding="utf-8") as handle:
        rows = [r["prompt"] for r in csv.DictReader(handle) if r["contaminated"] != "1"]
    return rows[::max(1, len(rows) // count)][:count]


def setup(strong_share: float, budgets: list[dict[str, Any]] | None = None,
          batching: dict[str, Any] | None = None,
          **quality: dict[str, Any]) -> tuple[Any, DifficultyRouter]:
    pools = [make_pool("cheap", model="m", count=1, base_port=8100,
                       quality=quality.get("cheap", {"tier": "weak"})),
             make_pool("strong", model="m", count=1, base_port=8200,
                       quality=quality.get("strong", {"tier": "strong"}))]
    policy = make_policy("chat", model="chat", pools=[{"name": "cheap"}, {"name": "strong"}],
                         difficulty={"enabled": True, "strongShare": strong_share},
                         budgets=budgets or [],
                         batching=batching or {"enabled": False})
    director, store = make_director(pools, [policy])
    difficulty = DifficultyRouter(store, CollectorRegistry())
    director.add_admission_hook(difficulty)
    if budgets:
        director.add_admission_hook(BudgetHook(store))
    return director, difficulty


async def route_all(director: Any, texts: list[str]) -> list[str]:
    pools = []
    for text in texts:
        decision = await director.route(LLMRequest(model="chat", prompt_text=text))
        pools.append(decision.pool.name)
        director.finish(decision, None, _ok())
    return pools


def _ok() -> Any:
    from kvroute_router.director import Outcome

    return Outcome(status=200)


@pytest.mark.parametrize("share", [0.2, 0.5])
async def test_strong_share_is_followed_and_hard_prompts_go_strong(share: float) -> None:
    director, _ = setup(share)
    texts = prompts(400)
    pools = await route_all(director, texts)
    strong = [t for t, p in zip(texts, pools, strict=True) if p == "strong"]
    cheap = [t for t, p in zip(texts, pools, strict=True) if p == "cheap"]
    assert abs(len(strong) / len(texts) - share) < 0.08
    hardness = HeuristicQualityEstimator.difficulty
    assert (sum(map(hardness, strong)) / len(strong)
            > sum(map(hardness, cheap)) / len(cheap))


async def test_extremes_and_budgets() -> None:
    director, _ = setup(0.0)
    assert set(await route_all(director, prompts(20))) == {"cheap"}
    director, _ = setup(1.0, budgets=[{"name": "rpm", "requestsPerMinute": 1000}])
    assert set(await route_all(director, prompts(20))) == {"strong"}


async def test_quality_score_ranks_before_tier() -> None:
    director, _ = setup(1.0, cheap={"tier": "strong", "score": 0.4},
                        strong={"tier": "weak", "score": 0.9})
    assert set(await route_all(director, prompts(10))) == {"strong"}


async def test_knn_without_data_falls_back_to_the_heuristic() -> None:
    difficulty = DifficultyRouter.__new__(DifficultyRouter)
    difficulty.quality_data = None
    difficulty._estimators = {}
    estimator, used = difficulty.estimator("knn-minilm")
    assert used == "heuristic" and isinstance(estimator, HeuristicQualityEstimator)


async def test_batch_level_sends_the_hardest_share_of_each_window_strong() -> None:
    """Batching on: a window of 10 concurrent requests at strongShare 0.3 sends exactly the 3
    hardest strong (the remainder carried), scored in one estimator call."""
    import asyncio

    director, _ = setup(0.3, batching={"enabled": True, "windowMs": 200, "maxBatchSize": 10})
    texts = prompts(10)

    async def one(text: str) -> str:
        decision = await director.route(LLMRequest(model="chat", prompt_text=text))
        director.finish(decision, None, _ok())
        return str(decision.pool.name)

    pools = await asyncio.wait_for(asyncio.gather(*(one(t) for t in texts)), 60)
    hardness = HeuristicQualityEstimator.difficulty
    hardest = sorted(texts, key=hardness, reverse=True)[:3]
    assert sorted(t for t, p in zip(texts, pools, strict=True) if p == "strong") == \
        sorted(hardest)

"""``max-score``: the highest total first; ties broken at random so equal endpoints share load."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.plugins import ScoredEndpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest


class MaxScorePicker:
    TYPE: ClassVar[str] = "max-score"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.name = self.TYPE
        self.rng = rng or random.Random()

    def pick(self, state: CycleState, request: LLMRequest,
             scored: Sequence[ScoredEndpoint], limit: int) -> list[ScoredEndpoint]:
        rnd = self.rng.random
        # Round totals so float noise does not defeat the random tie-break.
        ordered = sorted(scored, key=lambda s: (-round(s.total, 9), rnd()))
        return ordered[:limit]

    @classmethod
    def build(cls, context: PluginContext) -> MaxScorePicker:
        return cls()

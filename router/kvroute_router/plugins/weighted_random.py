"""``weighted-random``: endpoints drawn without replacement with probability proportional to
their total score (a small floor keeps zero-scored endpoints reachable as fallbacks)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.plugins import ScoredEndpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest

FLOOR = 1e-3


class WeightedRandomPicker:
    TYPE: ClassVar[str] = "weighted-random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.name = self.TYPE
        self.rng = rng or random.Random()

    def pick(self, state: CycleState, request: LLMRequest,
             scored: Sequence[ScoredEndpoint], limit: int) -> list[ScoredEndpoint]:
        # Efraimidis-Spirakis: key u^(1/w), largest keys first = weighted sampling w/o replacement.
        rnd = self.rng.random
        keyed = [(rnd() ** (1.0 / max(s.total, FLOOR)), i) for i, s in enumerate(scored)]
        keyed.sort(reverse=True)
        return [scored[i] for _, i in keyed[:limit]]

    def pick_indices(self, state: CycleState, request: LLMRequest,
                     totals: Sequence[float] | npt.NDArray[np.float64],
                     limit: int) -> list[int]:
        """``pick`` on the totals alone: the same keys, drawn in the same order."""
        rnd = self.rng.random
        values = totals.tolist() if isinstance(totals, np.ndarray) else list(totals)
        keyed = [(rnd() ** (1.0 / max(t, FLOOR)), i) for i, t in enumerate(values)]
        keyed.sort(reverse=True)
        return [i for _, i in keyed[:limit]]

    @classmethod
    def build(cls, context: PluginContext) -> WeightedRandomPicker:
        return cls()

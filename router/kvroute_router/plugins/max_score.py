"""``max-score``: the highest total first; ties broken at random so equal endpoints share load."""

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

TIE_MARGIN = 2e-9
"""Totals further than this below the limit-th largest one cannot round (9 decimals) to a tie
with it."""


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

    def pick_indices(self, state: CycleState, request: LLMRequest,
                     totals: Sequence[float] | npt.NDArray[np.float64],
                     limit: int) -> list[int]:
        """``pick`` on the totals alone: the same random draws in the same order, the same
        keys (-round(total, 9), draw), the same stable order. Rounding is monotone, so only
        totals within 2e-9 of the ``limit``-th largest can reach the first ``limit`` places:
        only those are rounded and sorted."""
        rnd = self.rng.random
        values = np.asarray(totals, dtype=np.float64)
        count = len(values)
        draws = [rnd() for _ in range(count)]
        if limit <= 0 or count == 0:
            return []
        keep = min(limit, count)
        kth = float(np.partition(values, count - keep)[count - keep])
        contenders = np.flatnonzero(values >= kth - TIE_MARGIN).tolist()
        ranked = sorted((-round(float(values[i]), 9), draws[i], i) for i in contenders)
        return [i for _, _, i in ranked[:keep]]

    @classmethod
    def build(cls, context: PluginContext) -> MaxScorePicker:
        return cls()

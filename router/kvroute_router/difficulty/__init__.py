"""Difficulty routing (``RoutePolicy.spec.difficulty``): see :mod:`.router`."""

from kvroute_router.difficulty.router import DifficultyRouter

__all__ = ["DifficultyRouter"]

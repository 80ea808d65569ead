"""Scheduler profiles: the filters, weighted scorers and picker for one (RoutePolicy, pool),
built from ``RoutePolicy.spec.scoring`` through the registry, and the scheduling cycle that runs
them (filter, then sum of clamped weighted scores, then pick).

Every profile first runs the filters registered as ``default_filter`` (in registration order).
A scorer type the registry lacks degrades to the fallback registered for it
(:meth:`PluginRegistry.add_fallback`, e.g. ``prefix-precise`` → ``prefix-approx``) with a
warning, so policies written for the full product still route when a component is missing; a
type with no fallback is skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from kvroute_api.route_policy import ScoringSpec

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.plugins import (
    DispatchObserver,
    Filter,
    Picker,
    ScoredEndpoint,
    Scorer,
)
from kvroute_router.framework.registry import PluginContext, PluginRegistry, Registration
from kvroute_router.framework.request import LLMRequest

log = logging.getLogger(__name__)

STATE_PREFIX_HELD = "profile/prefix-held"
"""CycleState key: the share of the prompt (0-1) each candidate holds, by endpoint name
(dict[str, float]; the largest over the profile's prefix scorers), written after the prefix
scorers ran and before the other scorers run (``prefill-cost`` reads it)."""


class ProfileBuildError(ValueError):
    """A profile names a plugin of the wrong kind or a picker that does not exist."""


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float
    type_name: str


def is_soft(flt: Filter) -> bool:
    """Whether ``flt`` removes endpoints only for load (class attribute ``SOFT = True``): what
    it removes stays a last-resort retry target instead of being dropped."""
    return bool(getattr(flt, "SOFT", False))


@dataclass
class SchedulerProfile:
    """Filters → weighted scorers → picker.

    Hard filters (health, the gateway's subset: an endpoint they remove must not be used) run
    before soft ones (``SOFT = True``, e.g. ``load-headroom``: an endpoint it removes is still a
    last-resort retry target). The profile enforces that order when it is built (a stable
    partition of ``filters``), so an endpoint a hard filter would drop is never held back as a
    retry target by a soft filter that ran first.

    Scores are clamped and summed per endpoint in NumPy arrays; a picker with
    ``pick_indices(state, request, totals, limit) -> list[int]`` (both built-ins) ranks from
    the totals, and only the endpoints it returns get a :class:`ScoredEndpoint` (with their
    per-scorer scores); other pickers get every candidate's ``ScoredEndpoint`` through ``pick``.
    """

    name: str
    filters: list[Filter]
    scorers: list[WeightedScorer]
    picker: Picker
    observers: list[DispatchObserver] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)
    """Requested scorer type → the type that stands in for it."""
    prefix_scorers: frozenset[str] = frozenset()
    """Scorer types whose score is a prefix-match ratio (declared at registration)."""
    share_prefix_held: bool = False
    """A scorer reads the prefix scorers' match (``STATE_PREFIX_HELD``): they run first and the
    profile writes it."""
    _order: list[int] = field(default_factory=list, init=False, repr=False)
    _prefix_count: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        hard = [f for f in self.filters if not is_soft(f)]
        soft = [f for f in self.filters if is_soft(f)]
        self.filters = hard + soft
        # Scorers run prefix scorers first, so the others may read what they matched
        # (STATE_PREFIX_HELD); columns and totals are kept in the policy's order.
        prefix = [i for i, s in enumerate(self.scorers) if s.type_name in self.prefix_scorers]
        rest = [i for i, s in enumerate(self.scorers) if s.type_name not in self.prefix_scorers]
        self._order = prefix + rest if self.share_prefix_held else list(range(len(self.scorers)))
        self._prefix_count = len(prefix) if self.share_prefix_held else 0

    def run(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint],
            limit: int) -> list[ScoredEndpoint]:
        """One scheduling cycle; returns up to ``limit`` endpoints, best first (empty when the
        filters leave nothing)."""
        candidates: Sequence[Endpoint] = endpoints
        held_back: list[Endpoint] = []
        for flt in self.filters:
            kept = flt.filter(state, request, candidates)
            if len(kept) < len(candidates) and is_soft(flt):
                # Removed only for load: still better than nothing as a retry target.
                names = {ep.name for ep in kept}
                held_back.extend(ep for ep in candidates if ep.name not in names)
            candidates = kept
            if not candidates:
                return []
        count = len(candidates)
        totals = np.zeros(count)
        by_position: dict[int, tuple[str, npt.NDArray[np.float64]]] = {}
        for number, position in enumerate(self._order):
            if number == self._prefix_count and number:
                held = np.max([by_position[i][1] for i in self._order[:number]], axis=0)
                state.write(STATE_PREFIX_HELD, dict(zip([ep.name for ep in candidates],
                                                        held.tolist(), strict=True)))
            weighted = self.scorers[position]
            values = weighted.scorer.score(state, request, candidates)
            if len(values) != count:
                raise ValueError(f"scorer {weighted.type_name} returned {len(values)} scores "
                                 f"for {count} endpoints")
            column = np.asarray(values, dtype=np.float64)
            # Clamp to [0, 1]; NaN fails both tests → 0.
            column = np.where(column > 1.0, 1.0, np.where(column >= 0.0, column, 0.0))
            by_position[position] = (weighted.type_name, column)
        columns = [by_position[i] for i in range(len(self.scorers))]
        for (_, column), weighted in zip(columns, self.scorers, strict=True):
            if weighted.weight:
                totals += weighted.weight * column
        pick_indices = getattr(self.picker, "pick_indices", None)
        if pick_indices is not None:
            order: list[int] = pick_indices(state, request, totals, limit)
            ranked = [_scored(candidates[i], i, totals, columns) for i in order]
        else:
            scored = [_scored(ep, i, totals, columns) for i, ep in enumerate(candidates)]
            ranked = self.picker.pick(state, request, scored, limit)
        if len(ranked) < limit and held_back:
            ranked.extend(ScoredEndpoint(ep) for ep in held_back[:limit - len(ranked)])
        return ranked

    def prefix_match(self, scored: ScoredEndpoint) -> float | None:
        """The share of the prompt ``scored``'s endpoint holds by the first of this profile's
        prefix scorers (None: no prefix scorer scored it)."""
        for name, value in scored.by_scorer.items():
            if name in self.prefix_scorers:
                return value
        return None

    def dispatched(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> None:
        for observer in self.observers:
            observer.on_dispatch(state, request, endpoint)


def _scored(endpoint: Endpoint, i: int, totals: npt.NDArray[np.float64],
            columns: list[tuple[str, npt.NDArray[np.float64]]]) -> ScoredEndpoint:
    return ScoredEndpoint(endpoint, float(totals[i]),
                          {name: float(column[i]) for name, column in columns})


@dataclass(frozen=True, slots=True)
class ScorerPlan:
    """The scorers a profile for one ``ScoringSpec`` runs, before any is built."""

    scorers: list[tuple[str, Registration, float]]
    """(type name, registration, weight) in the policy's order, stand-ins already applied."""
    degraded: dict[str, str]
    """Requested scorer type → the type that stands in for it ("" when dropped)."""
    reads_held: bool
    """A scorer reads the prefix scorers' match: prefix scorers at weight 0 run too."""
    warnings: list[str]
    """Why a requested scorer does not run as written (logged by :func:`build_profile`)."""

    def runs(self, type_name: str) -> bool:
        return any(name == type_name for name, _, _ in self.scorers)


def plan_scorers(registry: PluginRegistry, scoring: ScoringSpec) -> ScorerPlan:
    """Which scorers :func:`build_profile` builds for ``scoring``, and with what weight.

    A prefix scorer at weight 0 still runs when another scorer reads its match (prefill-cost):
    it supplies the share held, and keeps its bookkeeping (pending blocks, history). Any other
    scorer at weight 0 does not run."""
    scorers: list[tuple[str, Registration, float]] = []
    degraded: dict[str, str] = {}
    warnings: list[str] = []
    reads_held = any((entry := registry.lookup(str(item.type))) is not None
                     and entry.reads_prefix_held and item.weight > 0
                     for item in scoring.scorers)
    for item in scoring.scorers:
        type_name = str(item.type)
        entry = registry.lookup(type_name)
        fallback = registry.fallback_for(type_name) if entry is None else None
        if fallback is not None:
            stand_in = fallback
            if any(name == stand_in for name, _, _ in scorers) or any(
                    s.type == stand_in for s in scoring.scorers):
                warnings.append(f"scorer {type_name} is not available; {stand_in} is already "
                                f"configured, so {type_name} is dropped")
                degraded[type_name] = ""
                continue
            warnings.append(f"scorer {type_name} is not available in this router; using "
                            f"{stand_in} instead")
            degraded[type_name] = stand_in
            type_name, entry = stand_in, registry.lookup(stand_in)
        if entry is None:
            warnings.append(f"scorer {item.type} is not available; skipped")
            degraded[item.type] = ""
            continue
        if entry.kind != "scorer":
            raise ProfileBuildError(f"plugin {type_name!r} is a {entry.kind}, not a scorer")
        if item.weight <= 0 and not (reads_held and entry.prefix_match):
            continue
        scorers.append((type_name, entry, float(item.weight)))
    return ScorerPlan(scorers, degraded, reads_held, warnings)


def build_profile(registry: PluginRegistry, context: PluginContext, name: str) -> SchedulerProfile:
    """The profile for ``context.scoring``."""
    filters: list[Filter] = []
    for type_name in registry.default_filters():
        entry = registry.lookup(type_name)
        if entry is None:
            continue
        if entry.kind != "filter":
            raise ProfileBuildError(f"plugin {type_name!r} is a {entry.kind}, not a filter")
        filters.append(entry.factory(context))

    plan = plan_scorers(registry, context.scoring)
    for warning in plan.warnings:
        log.warning("profile %s: %s", name, warning)
    scorers = [WeightedScorer(entry.factory(context), weight, type_name)
               for type_name, entry, weight in plan.scorers]

    picker_entry = registry.lookup(context.scoring.picker)
    if picker_entry is None or picker_entry.kind != "picker":
        raise ProfileBuildError(f"picker {context.scoring.picker!r} is not registered; "
                                f"known pickers: {', '.join(registry.types('picker'))}")
    picker: Picker = picker_entry.factory(context)

    observers: list[DispatchObserver] = [
        plugin for plugin in [*filters, *(s.scorer for s in scorers), picker]
        if isinstance(plugin, DispatchObserver)]
    return SchedulerProfile(name=name, filters=filters, scorers=scorers, picker=picker,
                            observers=observers, degraded=plan.degraded,
                            prefix_scorers=registry.prefix_match_scorers(),
                            share_prefix_held=plan.reads_held)

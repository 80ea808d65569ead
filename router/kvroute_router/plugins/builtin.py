"""Registers the built-in plugins under their type names (no import-time side effects)."""

from __future__ import annotations

from kvroute_router.framework.registry import PluginRegistry
from kvroute_router.plugins.healthy_filter import HealthyFilter
from kvroute_router.plugins.load_headroom import LoadHeadroomFilter
from kvroute_router.plugins.load_scorers import (
    KVUtilizationScorer,
    QueueDepthScorer,
    RunningRequestsScorer,
)
from kvroute_router.plugins.lora_affinity import LoraAffinityScorer
from kvroute_router.plugins.max_score import MaxScorePicker
from kvroute_router.plugins.prefill_cost import PrefillCostScorer
from kvroute_router.plugins.prefix_approx import ApproxPrefixScorer, forget_endpoint
from kvroute_router.plugins.prefix_precise import PrecisePrefixScorer
from kvroute_router.plugins.subset_filter import SubsetFilter
from kvroute_router.plugins.weighted_random import WeightedRandomPicker


def register_builtin_plugins(registry: PluginRegistry) -> PluginRegistry:
    """Add every built-in filter, scorer and picker to ``registry`` and return it.

    The default filters run in every profile in this order: the gateway's subset, then health,
    then load headroom (so the scorers, prefix affinity above all, choose only among endpoints
    that are not saturated; see :mod:`kvroute_router.plugins.load_headroom`).
    """
    registry.register(SubsetFilter.TYPE, "filter", SubsetFilter.build, default_filter=True)
    registry.register(HealthyFilter.TYPE, "filter", HealthyFilter.build, default_filter=True)
    registry.register(LoadHeadroomFilter.TYPE, "filter", LoadHeadroomFilter.build,
                      default_filter=True)
    registry.register(QueueDepthScorer.TYPE, "scorer", QueueDepthScorer.build)
    registry.register(KVUtilizationScorer.TYPE, "scorer", KVUtilizationScorer.build)
    registry.register(RunningRequestsScorer.TYPE, "scorer", RunningRequestsScorer.build)
    registry.register(ApproxPrefixScorer.TYPE, "scorer", ApproxPrefixScorer.build,
                      prefix_match=True)
    registry.register(PrefillCostScorer.TYPE, "scorer", PrefillCostScorer.build,
                      reads_prefix_held=True)
    registry.register(LoraAffinityScorer.TYPE, "scorer", LoraAffinityScorer.build)
    registry.register(MaxScorePicker.TYPE, "picker", MaxScorePicker.build)
    registry.register(WeightedRandomPicker.TYPE, "picker", WeightedRandomPicker.build)
    # prefix-precise needs the KV-event index (registered by kvroute_router.kvevents when it is
    # usable); without it, policies that name it score by the approximate history.
    registry.add_fallback(PrecisePrefixScorer.TYPE, ApproxPrefixScorer.TYPE)
    registry.on_endpoint_removed(forget_endpoint)
    return registry

"""Registers the built-in plugins under their type names (no import-time side effects)."""

from __future__ import annotations

from kvroute_router.framework.registry import PluginRegistry
from kvroute_router.plugins.healthy_filter import HealthyFilter
from kvroute_router.plugins.kv_utilization import KVUtilizationScorer
from kvroute_router.plugins.load_headroom import LoadHeadroomFilter
from kvroute_router.plugins.lora_affinity import LoraAffinityScorer
from kvroute_router.plugins.max_score import MaxScorePicker
from kvroute_router.plugins.prefix_approx import ApproxPrefixScorer
from kvroute_router.plugins.queue_depth import QueueDepthScorer
from kvroute_router.plugins.running_requests import RunningRequestsScorer
from kvroute_router.plugins.subset_filter import SubsetFilter
from kvroute_router.plugins.weighted_random import WeightedRandomPicker


def register_builtin_plugins(registry: PluginRegistry) -> PluginRegistry:
    """Add every built-in filter, scorer and picker to ``registry`` and return it."""
    registry.register(HealthyFilter.TYPE, "filter", HealthyFilter.build)
    registry.register(SubsetFilter.TYPE, "filter", SubsetFilter.build)
    registry.register(LoadHeadroomFilter.TYPE, "filter", LoadHeadroomFilter.build)
    registry.register(QueueDepthScorer.TYPE, "scorer", QueueDepthScorer.build)
    registry.register(KVUtilizationScorer.TYPE, "scorer", KVUtilizationScorer.build)
    registry.register(RunningRequestsScorer.TYPE, "scorer", RunningRequestsScorer.build)
    registry.register(ApproxPrefixScorer.TYPE, "scorer", ApproxPrefixScorer.build)
    registry.register(LoraAffinityScorer.TYPE, "scorer", LoraAffinityScorer.build)
    registry.register(MaxScorePicker.TYPE, "picker", MaxScorePicker.build)
    registry.register(WeightedRandomPicker.TYPE, "picker", WeightedRandomPicker.build)
    return registry

"""What plugins declare when they register, and that the API's scorer names and the router's
registry name the same plugins (a scorer added to one but not the other fails here)."""

from __future__ import annotations

import typing

import pytest
from kvroute_api.route_policy import PickerType, ScorerType
from kvroute_router.framework.registry import PluginRegistry, SharedServices
from kvroute_router.kvevents.feed import register_precise_prefix
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex, services_key


def full_registry() -> PluginRegistry:
    registry = register_builtin_plugins(PluginRegistry())
    assert register_precise_prefix(registry)
    return registry


def test_the_api_and_the_registry_name_the_same_scorers_and_pickers() -> None:
    registry = full_registry()
    assert set(typing.get_args(ScorerType)) == set(registry.types("scorer"))
    assert set(typing.get_args(PickerType)) == set(registry.types("picker"))


def test_plugins_declare_default_filters_fallbacks_and_prefix_scorers() -> None:
    builtin = register_builtin_plugins(PluginRegistry())
    assert builtin.default_filters() == ["subset-filter", "healthy-filter", "load-headroom"]
    assert builtin.fallback_for("prefix-precise") == "prefix-approx"
    assert builtin.prefix_match_scorers() == {"prefix-approx"}
    assert full_registry().prefix_match_scorers() == {"prefix-approx", "prefix-precise"}


def test_a_removed_endpoint_is_forgotten_by_the_approximate_history() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    services = SharedServices()
    index = services.get_or_create(services_key("default/pool"), ApproxPrefixIndex,
                                   ApproxPrefixIndex)
    index.record("a", [1, 2, 3])
    index.record("b", [1, 2])
    registry.endpoint_removed(services, "default/pool", "a")
    assert index.blocks("a") == 0
    assert index.blocks("b") == 2


def test_only_a_filter_can_be_a_default_filter() -> None:
    with pytest.raises(ValueError, match="only a filter"):
        PluginRegistry().register("x", "scorer", lambda ctx: None, default_filter=True)

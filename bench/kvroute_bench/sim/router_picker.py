"""A simulator picker that runs kvroute's own scheduler: filters, weighted scorers, picker.

It builds a ``SchedulerProfile`` from a RoutePolicy's ``scoring`` with the router's plugin
registry (``register_builtin_plugins``) exactly as the router's director does, shows it one
``Endpoint`` per simulated engine with metrics taken from that engine at decision time, and
reports each dispatch back to the profile (so ``prefix-approx`` learns its history as in
production). Not yet wired: the KV-event index behind ``prefix-precise`` (the simulator's
block hashes would have to be the router's vLLM-compatible ones); until then the registry's
fallback stands in for it, as in a router without KV events. Simulated metrics are always
fresh: the real router scrapes every ~100 ms, so this is its best case.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvroute_api.route_policy import ScoringSpec
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics
from kvroute_router.framework.profile import SchedulerProfile, build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.builtin import register_builtin_plugins

from kvroute_bench.sim.engine import SimEngine, SimRequest

POOL_KEY = "sim/pool"


class RouterPicker:
    """Routes simulated requests with the router's scheduler profile for ``scoring``."""

    def __init__(self, scoring: dict[str, Any] | ScoringSpec, model: str = "sim-model",
                 block_size: int = 32) -> None:
        spec = scoring if isinstance(scoring, ScoringSpec) else ScoringSpec.model_validate(
            scoring)
        registry = register_builtin_plugins(PluginRegistry())
        context = PluginContext(scoring=spec, pool_key=POOL_KEY, pool=None,
                                services=SharedServices(), policy_key="sim/policy")
        self.profile: SchedulerProfile = build_profile(registry, context, "sim")
        self.model = model
        self.block_size = block_size
        self._endpoints: list[Endpoint] = []

    def observe(self, engine: int, events: list[dict[str, Any]]) -> None:
        return None  # the KV-event index is not wired yet (see the module docstring)

    def _sync(self, engines: Sequence[SimEngine]) -> list[Endpoint]:
        while len(self._endpoints) < len(engines):
            i = len(self._endpoints)
            self._endpoints.append(Endpoint(name=f"pod-{i}", address=f"10.0.0.{i}:8000",
                                            pool=POOL_KEY))
        now = time.monotonic()
        for endpoint, engine in zip(self._endpoints, engines, strict=False):
            m = engine.metrics()
            endpoint.metrics = EndpointMetrics(
                running=m["vllm:num_requests_running"], waiting=m["vllm:num_requests_waiting"],
                kv_cache_usage=m["vllm:kv_cache_usage_perc"],
                prefix_cache_queries=m["vllm:prefix_cache_queries_total"],
                prefix_cache_hits=m["vllm:prefix_cache_hits_total"],
                block_size=self.block_size, num_gpu_blocks=engine.profile.kv_blocks,
                scraped_at=now)
            endpoint.in_flight = len(engine.running) + len(engine.waiting)
            endpoint.dispatched_since_scrape = 0
        return self._endpoints[: len(engines)]

    def pick(self, request: SimRequest, engines: Sequence[SimEngine]) -> int:
        endpoints = self._sync(engines)
        llm = LLMRequest(model=self.model, prompt_text=request.prompt,
                         max_tokens=request.max_tokens)
        state = CycleState()
        ranked = self.profile.run(state, llm, endpoints, 1)
        if not ranked:
            raise RuntimeError("the router's filters left no endpoint for a simulated request")
        chosen = ranked[0].endpoint
        self.profile.dispatched(state, llm, chosen)
        return endpoints.index(chosen)

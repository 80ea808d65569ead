"""The leak-watching gauges on a router's /metrics: process RSS and open fds, asyncio tasks, and
the entries of the in-memory tables that grow with traffic (bench/soak.py reads them)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from kvroute_router.app import Router, RouterSettings
from kvroute_router.budget.meters import SWEEP_S, InMemoryMeterStore, MeterCharge, MeterKind
from kvroute_router.router_metrics import Children, RouterMetrics
from prometheus_client import generate_latest


def _samples(router: Router) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in router.metrics.registry.collect() for s in family.samples}


async def test_a_router_exports_tasks_table_sizes_and_process_gauges() -> None:
    router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                   metrics_port=None, kv_events=False))
    await router.start()
    try:
        held = asyncio.get_running_loop().create_task(asyncio.sleep(60), name="held")
        samples = _samples(router)
        tasks = samples[("kvroute_asyncio_tasks", ())]
        assert tasks >= 2  # this test's own task and ``held``, at least
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        assert _samples(router)[("kvroute_asyncio_tasks", ())] == tasks - 1
        tables = {labels[0][1]: v for (name, labels), v in samples.items()
                  if name == "kvroute_internal_entries"}
        assert {"budget_tracked_tenants", "budget_meter_keys", "budget_inflight_members",
                "admission_controllers", "datastore_endpoints",
                "prefix_approx_history_blocks", "prefill_in_flight"} <= set(tables)
        assert tables["prefill_in_flight"] == 0
        if sys.platform == "linux":
            assert samples[("process_resident_memory_bytes", ())] > 0
            assert samples[("process_open_fds", ())] > 0
        assert b"kvroute_internal_entries{table=\"budget_meter_keys\"}" in generate_latest(
            router.metrics.registry)
    finally:
        await router.stop()


@pytest.mark.parametrize("kind", ["window", "inflight"])
async def test_meter_store_sizes_count_keys_buckets_and_members(kind: MeterKind) -> None:
    store = InMemoryMeterStore()
    assert store.sizes() == {"budget_meter_keys": 0, "budget_window_buckets": 0,
                             "budget_inflight_members": 0}
    charge = MeterCharge(key="k", kind=kind, limit=10, amount=1, window_s=60, buckets=1)
    assert await store.try_charge([charge], now=0.0, member="m", deadline=100.0) is None
    sizes = store.sizes()
    assert sizes["budget_meter_keys"] == 1
    assert sizes["budget_window_buckets" if kind == "window" else "budget_inflight_members"] == 1


def test_a_pool_reports_its_kv_event_caches(tmp_path: Path) -> None:
    from kvroute_cli.testmodel import build_test_model
    from kvroute_router.kvevents.hashing import BlockHashConfig
    from kvroute_router.kvevents.hub import PoolKVEvents
    from kvroute_router.kvevents.tokenization import PromptTokenizer

    tokenizer = PromptTokenizer.from_directory(build_test_model(tmp_path / "model"))
    pool = PoolKVEvents(BlockHashConfig(block_size=16), tokenizer=tokenizer)
    assert pool.sizes()["kv_tokenizer_cache_tokens"] == 0
    tokens = tokenizer.encode("a prompt of a few tokens", add_special_tokens=True)
    pool.hasher.block_digests(list(tokens) * 40)
    sizes = pool.sizes()
    assert sizes["kv_tokenizer_cache_prompts"] == 1
    assert sizes["kv_tokenizer_cache_tokens"] == len(tokens)
    assert sizes["kv_hash_memo_blocks"] > 0
    assert sizes["kv_index_pending_blocks"] == 0


async def test_meters_of_tenants_gone_quiet_are_dropped() -> None:
    """One meter key per tenant ever seen stayed in memory (pruned only when its tenant came
    back); the store now sweeps meters left empty."""
    store = InMemoryMeterStore()
    for tenant in range(100):  # tenants that come once
        charges = [MeterCharge(key=f"t{tenant}:tokens", kind="window", limit=1e9, amount=10),
                   MeterCharge(key=f"t{tenant}:concurrency", kind="inflight", limit=10,
                               amount=1)]
        assert await store.try_charge(charges, now=tenant / 100, member="r",
                                      deadline=30.0) is None
        await store.release(f"t{tenant}:concurrency", "r")
    assert store.sizes()["budget_meter_keys"] == 100  # their windows still count
    later = 60.0 + SWEEP_S  # every window has passed, a sweep is due
    live = MeterCharge(key="steady:tokens", kind="window", limit=1e9, amount=10)
    assert await store.try_charge([live], now=later, member="r", deadline=later + 30) is None
    assert store.sizes() == {"budget_meter_keys": 1, "budget_window_buckets": 1,
                             "budget_inflight_members": 0}


def test_the_approximate_history_counts_its_entries() -> None:
    from kvroute_router.framework.registry import SharedServices
    from kvroute_router.plugins.prefix_approx import (
        ApproxPrefixIndex,
        history_entries,
        services_key,
    )

    services = SharedServices()
    assert history_entries(services, "default/pool") == 0
    index = ApproxPrefixIndex(max_blocks_per_endpoint=3)
    services.put(services_key("default/pool"), index)
    index.record("e0", [1, 2])
    index.record("e1", [1, 2, 3, 4, 5])  # over its bound: the oldest leave
    assert index.entries() == 5
    assert history_entries(services, "default/pool") == 5


async def test_start_up_heap_is_frozen_only_when_asked() -> None:
    """``kvroute router`` freezes what start-up built (``--gc-freeze``, on by default): a full
    collection under traffic then scans only traffic's objects (~3 ms instead of ~70 ms with 64
    engines, router-cpu.md round 8). Off in RouterSettings by default: gc.freeze is process-wide."""
    import gc

    gc.unfreeze()
    plain = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                  metrics_port=None, kv_events=False))
    await plain.start()
    try:
        await asyncio.sleep(0.2)
        assert gc.get_freeze_count() == 0
    finally:
        await plain.stop()
    router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                   metrics_port=None, freeze_startup_heap=True))
    await router.start()
    try:
        assert router._freeze_task is not None
        async with asyncio.timeout(30):
            await router._freeze_task
        assert gc.get_freeze_count() > 1000  # modules, plugins, the app: start-up's objects
    finally:
        await router.stop()
        gc.unfreeze()


def test_the_cli_freezes_by_default() -> None:
    import argparse

    from kvroute_cli.cmd_router import register

    top = argparse.ArgumentParser()
    register(top.add_subparsers(dest="command"))
    assert top.parse_args(["router", "--config", "x.yaml"]).gc_freeze is True
    assert top.parse_args(["router", "--config", "x.yaml", "--no-gc-freeze"]).gc_freeze is False


def _lag(router: Router) -> tuple[float, float]:
    """(samples, samples more than 25 ms late) of the loop-lag histogram."""
    get = router.metrics.registry.get_sample_value
    count = get("kvroute_event_loop_lag_seconds_count") or 0.0
    return count, count - (get("kvroute_event_loop_lag_seconds_bucket", {"le": "0.025"}) or 0.0)


def _full_collections(router: Router) -> float:
    get = router.metrics.registry.get_sample_value
    return get("kvroute_gc_pause_seconds_count", {"generation": "2"}) or 0.0


async def test_a_blocked_event_loop_shows_in_the_lag_histogram() -> None:
    """A callback that holds the loop for 60 ms makes the next lag sample at least that late:
    what a request arriving meanwhile waited (router-cpu.md breaks the ceiling's tail down
    with it)."""
    import time

    router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                   metrics_port=None, kv_events=False,
                                   loop_lag_probe_s=0.01))
    await router.start()
    try:
        await asyncio.sleep(0.1)
        count, late = _lag(router)
        assert count >= 3
        # Samples already this late (a busy machine can deschedule the test): counted as a base.
        time.sleep(0.06)  # noqa: ASYNC251 - blocking the loop is the point
        await asyncio.sleep(0.05)
        after, late_after = _lag(router)
        assert after > count
        assert late_after >= late + 1  # the held one, > 25 ms late
    finally:
        await router.stop()
    stopped, _ = _lag(router)
    await asyncio.sleep(0.05)
    assert _lag(router)[0] == stopped  # disarmed


async def test_garbage_collections_are_timed_by_generation() -> None:
    import gc

    router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                   metrics_port=None, kv_events=False, loop_lag_probe_s=0))
    await router.start()
    try:
        before = _full_collections(router)
        gc.collect()
        after = _full_collections(router)
        assert after >= before + 1  # (another, automatic, pass may land in between)
        assert _lag(router)[0] == 0  # probe off
    finally:
        await router.stop()
    gc.collect()  # the callback is gone with the router
    assert _full_collections(router) == after


def test_children_are_the_series_the_registry_exports() -> None:
    # The hot paths look labelled series up through Children instead of labels(): the child
    # must be the registered one (what /metrics shows), once per label values.
    metrics = RouterMetrics()
    requests = Children(metrics.requests)
    requests("policy", "pool", "engine-0", "200").inc()
    requests("policy", "pool", "engine-0", "200").inc(2)
    requests("policy", "pool", "engine-1", "429").inc()
    assert requests("policy", "pool", "engine-0", "200") is metrics.requests.labels(
        "policy", "pool", "engine-0", "200")
    text = generate_latest(metrics.registry).decode()
    assert ('kvroute_requests_total{endpoint="engine-0",policy="policy",pool="pool",status="200"}'
            ' 3.0') in text
    assert 'endpoint="engine-1",policy="policy",pool="pool",status="429"} 1.0' in text


def test_a_gc_pass_at_the_bottom_of_a_deep_stack_never_raises_from_the_probe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GC callback runs wherever a collection starts; at the recursion limit its own calls
    raise RecursionError, which escaped from inside the collector (a loopback fuzz test failed
    on it). The probe drops that pass instead, and the next one is measured."""
    from kvroute_router.router_metrics import RuntimeProbes
    from prometheus_client import CollectorRegistry

    probes = RuntimeProbes(RouterMetrics(CollectorRegistry()), 0)
    observed: list[float] = []

    def deep(value: float) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    for child in probes._gc_pause:
        monkeypatch.setattr(child, "observe", deep)
    probes._on_gc("start", {"generation": 0})
    probes._on_gc("stop", {"generation": 0})  # raised before
    probes._on_gc("stop", {"generation": 0})  # no start recorded: nothing observed
    for child in probes._gc_pause:
        monkeypatch.setattr(child, "observe", observed.append)
    probes._on_gc("start", {"generation": 2})
    probes._on_gc("stop", {"generation": 2})
    assert len(observed) == 1 and observed[0] >= 0

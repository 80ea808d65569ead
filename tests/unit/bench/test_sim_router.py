"""The simulator's router picker: KV events into the router's own index, scraped metrics with
staleness, and the run-time picker names."""

from __future__ import annotations

import itertools
import random

import pytest
from kvroute_bench.sim.fleet import SimResult, simulate, to_sim_requests
from kvroute_bench.sim.router_picker import RouterPicker
from kvroute_bench.sim.run import make_picker, needs_block_hashes, split_picker_name
from kvroute_bench.workloads import ChatParams, generate
from kvroute_emulator.model.engine import SimEngine, SimRequest
from kvroute_emulator.model.profile import CostProfile, cpu_test_engine
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.plugins.max_score import MaxScorePicker

PROFILE = CostProfile(name="test", prefill_s_per_token=0.001, step_base_s=0.01,
                      decode_step_s_by_batch={1: 0.01, 8: 0.02}, max_num_seqs=4,
                      max_batched_tokens=64, block_size=4, kv_blocks=400)
PRECISE = {"scorers": [{"type": "prefix-precise", "weight": 3.0},
                       {"type": "queue-depth", "weight": 1.0}]}


def sim_request(rid: int, prompt: str, at: float = 0.0) -> SimRequest:
    return SimRequest(id=rid, arrival_s=at, prompt_tokens=len(prompt.encode()), max_tokens=1,
                      hashes=[], prompt=prompt)


def drain(engine: SimEngine, picker: RouterPicker, now: float = 0.0) -> float:
    for _ in range(1000):
        plan = engine.plan_step(now)
        if plan is None:
            break
        now += engine.step_duration(plan)
        engine.finish_step(plan, now)
    picker.observe(engine.index, engine.drain_events())
    return now


def test_precise_picker_feeds_engine_events_with_the_routers_hashes() -> None:
    picker = RouterPicker(PRECISE, block_size=PROFILE.block_size, precise=True)
    assert [s.type_name for s in picker.profile.scorers] == ["prefix-precise", "queue-depth"]
    assert picker.profile.degraded == {}
    engines = [SimEngine(i, PROFILE) for i in range(4)]
    first = sim_request(1, "system prompt " * 10 + "question one")
    chosen = picker.pick(first, engines)
    # The request carries the router's vLLM-compatible hashes of its prompt bytes.
    hasher = BlockHasher(BlockHashConfig(block_size=PROFILE.block_size))
    assert first.hashes == hasher.block_hashes(list(first.prompt.encode()))
    engines[chosen].enqueue(first)
    drain(engines[chosen], picker)
    index = picker.pool_events.index
    assert index.block_count(f"pod-{chosen}") == len(first.hashes)
    second = sim_request(2, "system prompt " * 10 + "question two", at=10.0)
    matched = index.match(hasher.block_hashes(list(second.prompt.encode())))
    assert matched == {f"pod-{chosen}": 37}  # the shared 149 bytes: 37 blocks of 4
    assert picker.pick(second, engines) == chosen


def test_precise_picker_forgets_evicted_blocks() -> None:
    picker = RouterPicker(PRECISE, block_size=PROFILE.block_size, precise=True)
    engine = SimEngine(0, PROFILE)
    req = sim_request(1, "abcd" * 20)
    picker.pick(req, [engine])
    engine.enqueue(req)
    drain(engine, picker)
    assert picker.pool_events.index.block_count("pod-0") == 20
    engine._evict(PROFILE.kv_blocks)  # make room for everything: evicts all cached blocks
    picker.observe(0, engine.drain_events())
    assert picker.pool_events.index.block_count("pod-0") == 0


def test_scraped_metrics_change_only_at_scrapes_and_count_dispatches() -> None:
    picker = RouterPicker({"scorers": [{"type": "queue-depth", "weight": 1.0}]},
                          block_size=PROFILE.block_size, scrape_interval_s=0.1)
    engines = [SimEngine(i, PROFILE) for i in range(2)]
    picker.scrape(engines, 0.0)
    endpoints = picker._endpoints
    assert [ep.metrics.waiting for ep in endpoints if ep.metrics] == [0.0, 0.0]
    picks = []
    for rid in range(4):
        req = sim_request(rid, f"prompt {rid}", at=0.01 * rid)
        choice = picker.pick(req, engines)
        engines[choice].enqueue(req)
        picks.append(choice)
    # No scrape yet: the snapshot still says idle, the router's own dispatches spread the
    # load (queue-depth counts dispatched_since_scrape as waiting).
    assert sorted(picks) == [0, 0, 1, 1]
    assert [ep.metrics.waiting for ep in endpoints if ep.metrics] == [0.0, 0.0]
    assert [ep.dispatched_since_scrape for ep in endpoints] == [2, 2]
    assert [ep.in_flight for ep in endpoints] == [2, 2]
    picker.scrape(engines, 0.1)
    assert [ep.metrics.waiting for ep in endpoints if ep.metrics] == [2.0, 2.0]
    assert [ep.dispatched_since_scrape for ep in endpoints] == [0, 0]


def test_fleet_scrapes_on_the_simulated_clock() -> None:
    scrapes: list[float] = []

    class Counting(RouterPicker):
        def scrape(self, engines: list[SimEngine], now: float) -> None:  # type: ignore[override]
            scrapes.append(now)
            super().scrape(engines, now)

    trace = generate(ChatParams(requests=30, rate=10.0))
    profile = cpu_test_engine()
    picker = Counting({"scorers": [{"type": "prefix-approx", "weight": 1.0}]},
                      block_size=profile.block_size, scrape_interval_s=0.1)
    result = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True),
                      pods=3, profile=profile, picker=picker)
    assert result.unfinished == 0
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(scrapes)}
    assert gaps == {0.1}
    assert scrapes[0] == trace.requests[0].arrival_s
    assert scrapes[-1] <= result.simulated_s + 0.1


def test_precise_run_on_a_chat_trace_hits_more_than_round_robin() -> None:
    trace = generate(ChatParams(requests=80, rate=4.0))
    profile = cpu_test_engine()
    rr = simulate(to_sim_requests(trace.requests, profile.block_size), pods=4,
                  profile=profile, picker=make_picker("round-robin", profile.block_size))
    precise = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True,
                                       hash_blocks=False), pods=4, profile=profile,
                       picker=make_picker("kvroute-precise-load@100", profile.block_size))
    assert precise.unfinished == 0
    assert precise.prefix_hit_rate > rr.prefix_hit_rate


def test_a_kvroute_run_reproduces_its_numbers() -> None:
    """The same trace through the same picker twice gives the same result: the scheduler's
    random tie-break draws from a seeded stream in the simulator, so an A/B of two settings
    differs by the setting, not by the draws (ties are common on an idle fleet)."""
    trace = generate(ChatParams(requests=60, rate=20.0))
    profile = cpu_test_engine()

    def run() -> SimResult:
        picker = make_picker("kvroute-precise-cost@100", profile.block_size)
        return simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True,
                                        hash_blocks=False), pods=6, profile=profile,
                        picker=picker)

    assert run() == run()


def test_picker_names() -> None:
    assert split_picker_name("kvroute-approx-load") == ("kvroute-approx-load", 0.0)
    assert split_picker_name("kvroute-approx-load@100") == ("kvroute-approx-load", 0.1)
    assert not needs_block_hashes("kvroute-precise-load@100")
    assert needs_block_hashes("kvroute-approx") and needs_block_hashes("round-robin")
    picker = make_picker("kvroute-precise-load@50", 32)
    assert isinstance(picker, RouterPicker)
    assert picker.precise and picker.scrape_interval_s == pytest.approx(0.05)
    with pytest.raises(SystemExit):
        make_picker("round-robin@100", 32)
    with pytest.raises(SystemExit):
        make_picker("kvroute-approx@soon", 32)


@pytest.mark.parametrize(("picker", "fingerprint"), [("max-score", "6d056d5b565957dc"),
                                                     ("weighted-random", "bbfbbc460e204a4d")])
def test_fast_paths_pick_what_the_per_endpoint_code_picked(picker: str,
                                                           fingerprint: str) -> None:
    """Fingerprints of every request's engine, recorded with the code before the vectorised
    decision path and the event-driven fleet loop (commit f9e21b3): same seeds, same picks.
    Re-recorded once since, unchanged routing code, when the engine model began caching a
    block as the step that fills it is scheduled (the picks read the engines' KV usage)."""
    import hashlib
    import random

    from kvroute_bench.workloads import build_params

    profile = cpu_test_engine(384)
    trace = generate(build_params("chat", None, requests=600, rate=24, seed=3))
    reqs = to_sim_requests(trace.requests, profile.block_size, keep_text=True)
    sim_picker = RouterPicker({"picker": picker, "scorers": [
        {"type": "prefix-approx", "weight": 3.0}, {"type": "queue-depth", "weight": 1.0},
        {"type": "kv-utilization", "weight": 1.0}, {"type": "running-requests", "weight": 1.0}]},
        block_size=32)
    sim_picker.profile.picker.rng = random.Random(11)  # type: ignore[attr-defined]
    simulate(reqs, 24, profile, sim_picker)
    engines = ",".join(str(r.engine) for r in reqs)
    assert hashlib.sha256(engines.encode()).hexdigest()[:16] == fingerprint


def test_replicated_picker_names() -> None:
    from kvroute_bench.sim.router_picker import ReplicatedPicker
    from kvroute_bench.sim.run import split_replicas

    assert split_replicas("kvroute-precise-load@100") == ("kvroute-precise-load@100", 1, "")
    assert split_replicas("kvroute-precise-load@100/x3") == ("kvroute-precise-load@100", 3, "")
    assert split_replicas("kvroute-precise-load/x2shared") == ("kvroute-precise-load", 2, "all")
    assert split_replicas("kvroute-precise-load/x2both")[2] == "both"
    assert split_replicas("kvroute-precise-load/x2pending")[2] == "pending"
    assert split_replicas("kvroute-precise-load/x2counts")[2] == "counts"
    picker = make_picker("kvroute-precise-load@100/x3", 32)
    assert isinstance(picker, ReplicatedPicker) and len(picker.replicas) == 3
    assert picker.scrape_interval_s == pytest.approx(0.1)
    assert len({id(r.pool_events.index) for r in picker.replicas}) == 3  # nothing shared
    assert not needs_block_hashes("kvroute-precise-load@100/x3")
    for bad in ("round-robin/x3", "kvroute-precise-load/3", "kvroute-precise-load/x0"):
        with pytest.raises(SystemExit):
            make_picker(bad, 32)


def test_replicas_draw_their_own_tie_breaks() -> None:
    """Router processes seed their tie-breaks apart: replicas drawing one stream would pick
    the same engine among equals at their k-th decisions, a herd no real fleet has."""
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    picker = make_picker("kvroute-precise-cost@100/x3shared~1", 32)
    assert isinstance(picker, ReplicatedPicker)
    pickers = [replica.profile.picker for replica in picker.replicas]
    assert all(isinstance(p, MaxScorePicker) for p in pickers)
    draws = [tuple(p.rng.random() for _ in range(4))
             for p in pickers if isinstance(p, MaxScorePicker)]
    assert len(set(draws)) == len(draws)
    one = make_picker("kvroute-precise-cost@100", 32)  # one router: stream 0, as before
    assert isinstance(one, RouterPicker) and isinstance(one.profile.picker, MaxScorePicker)
    assert one.profile.picker.rng.random() == random.Random(0).random()


def test_sync_delay_names() -> None:
    from kvroute_bench.sim.router_picker import ReplicatedPicker
    from kvroute_bench.sim.run import split_sync_delay

    assert split_sync_delay("kvroute-precise-cost@100/x3shared") == (
        "kvroute-precise-cost@100/x3shared", None)
    assert split_sync_delay("kvroute-precise-cost@100/x3shared~16") == (
        "kvroute-precise-cost@100/x3shared", 0.016)
    picker = make_picker("kvroute-precise-cost@100/x3shared~0", 32)
    assert isinstance(picker, ReplicatedPicker) and picker.as_processes
    assert picker.delay_s == 0.0 and picker.scrape_interval_s == pytest.approx(0.1 / 3)
    idealised = make_picker("kvroute-precise-cost@100/x3shared", 32)
    assert isinstance(idealised, ReplicatedPicker) and not idealised.as_processes
    assert not needs_block_hashes("kvroute-precise-cost@100/x3shared~8")
    for bad in ("kvroute-precise-cost~5", "kvroute-precise-cost/x3shared~x"):
        with pytest.raises(SystemExit):
            make_picker(bad, 32)


def _as_processes(delay_s: float) -> tuple[object, list[SimEngine]]:
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    picker = ReplicatedPicker(lambda seed: RouterPicker(PRECISE, block_size=PROFILE.block_size,
                                                        scrape_interval_s=0.09, precise=True,
                                                        seed=seed),
                              3, "all", delay_s)
    engines = [SimEngine(i, PROFILE) for i in range(4)]
    for _ in range(3):  # one replica per scrape
        picker.scrape(engines, 0.0)
    return picker, engines


def test_a_shared_dispatch_reaches_the_others_after_the_delay() -> None:
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    picker, engines = _as_processes(0.01)
    assert isinstance(picker, ReplicatedPicker)
    first = sim_request(1, "tenant context " * 10 + "question one")
    chosen = picker.pick(first, engines)
    engines[chosen].enqueue(first)

    def known() -> list[int]:
        return [r._endpoints[chosen].dispatched_since_scrape for r in picker.replicas]

    assert known() == [1, 0, 0]  # on its way
    other = sim_request(2, "another tenant " * 10 + "question", at=0.005)
    picker.pick(other, engines)  # replica 1, before the first record is due
    assert [r.pool_events.index.match(first.hashes).get(f"pod-{chosen}", 0)
            for r in picker.replicas][1:] == [0, 0]
    third = sim_request(3, "a third tenant " * 10 + "question", at=0.011)
    picker.pick(third, engines)  # due by now: every replica knows of the first
    assert all(r.pool_events.index.match(first.hashes).get(f"pod-{chosen}", 0)
               == len(first.hashes) for r in picker.replicas)


def test_replicas_as_processes_scrape_in_turn_and_release_at_their_own_points() -> None:
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    picker, engines = _as_processes(0.0)
    assert isinstance(picker, ReplicatedPicker)
    assert list(picker.release(engines, 0.0)) == []  # nothing held yet
    picker.scrape(engines, 0.03)
    picker.scrape(engines, 0.06)
    assert [r.now for r in picker.replicas] == [0.03, 0.06, 0.0]  # each at its own phase
    for k, replica in enumerate(picker.replicas):  # every replica holds a request
        replica.held.append(sim_request(10 + k, "held " * 5, at=0.06))
    released = list(picker.release(engines, 0.06))  # replicas 0 and 1 scraped since
    assert sorted(request.id for request, _ in released) == [10, 11]
    assert [len(r.held) for r in picker.replicas] == [0, 0, 1]
    picker.replicas[0].held.append(sim_request(20, "held again " * 5, at=0.07))
    arrival = sim_request(21, "arrives " * 5, at=0.07)
    assert picker.hold(arrival, engines)  # replica 0's arrival (queued behind its own)
    assert [request.id for request, _ in picker.release(engines, 0.07)] == [20, 21]
    assert [len(r.held) for r in picker.replicas] == [0, 0, 1]  # replica 2 had no point


def _replicated(shared: str) -> tuple[object, list[SimEngine]]:
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    picker = ReplicatedPicker(lambda seed: RouterPicker(PRECISE, block_size=PROFILE.block_size,
                                                        scrape_interval_s=0.1, precise=True,
                                                        seed=seed),
                              3, shared)
    engines = [SimEngine(i, PROFILE) for i in range(4)]
    picker.scrape(engines, 0.0)
    return picker, engines


@pytest.mark.parametrize("shared", ["", "pending", "counts", "both", "all"])
def test_replicas_take_turns_and_share_only_when_told(shared: str) -> None:
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    picker, engines = _replicated(shared)
    assert isinstance(picker, ReplicatedPicker)
    first = sim_request(1, "tenant context " * 10 + "question one")
    chosen = picker.pick(first, engines)
    engines[chosen].enqueue(first)
    # Only the first replica dispatched; the others learn of it only when shared.
    counts = [r._endpoints[chosen].dispatched_since_scrape for r in picker.replicas]
    pending = [r.pool_events.index.match(first.hashes).get(f"pod-{chosen}", 0)
               for r in picker.replicas]
    full = len(first.hashes)
    backlog = [r._endpoints[chosen].prefill_backlog for r in picker.replicas]
    assert counts == ([1, 1, 1] if shared in ("counts", "both", "all") else [1, 0, 0])
    assert pending == ([full] * 3 if shared in ("pending", "both", "all") else [full, 0, 0])
    assert backlog[0] > 0 and backlog == (backlog[:1] * 3 if shared == "all"
                                          else [backlog[0], 0, 0])
    # The second request (same tenant, before the first's blocks are published) goes to
    # replica 2: it follows the first to its engine only if it knew of it.
    second = sim_request(2, "tenant context " * 10 + "question two", at=0.001)
    again = picker.pick(second, engines)
    if shared in ("pending", "both", "all"):
        assert again == chosen
    assert picker.replicas[1]._endpoints[again].dispatched_since_scrape >= 1


def test_pending_ttl_reaches_every_replica() -> None:
    from kvroute_bench.sim.router_picker import ReplicatedPicker
    from kvroute_bench.sim.run import set_pending_ttl

    single = make_picker("kvroute-precise-load@100", 32)
    replicated = make_picker("kvroute-precise-load@100/x3", 32)
    set_pending_ttl(single, 0.08)
    set_pending_ttl(replicated, 0.08)
    set_pending_ttl(make_picker("round-robin", 32), 0.08)  # no index: nothing to set
    assert isinstance(single, RouterPicker) and isinstance(replicated, ReplicatedPicker)
    assert single.pool_events.index.pending_ttl == 0.08
    assert [r.pool_events.index.pending_ttl for r in replicated.replicas] == [0.08] * 3


def test_the_prefill_backlog_moves_as_in_the_director() -> None:
    """prefill-cost in the simulator: a dispatch adds the prompt tokens the engine does not hold
    (the router's estimate: bytes / 4), the first token takes them off."""
    picker = RouterPicker({"scorers": [{"type": "prefix-precise", "weight": 0},
                                       {"type": "prefill-cost"}]},
                          block_size=PROFILE.block_size, precise=True)
    engines = [SimEngine(i, PROFILE) for i in range(2)]
    first = sim_request(1, "system prompt " * 10 + "question one")  # 152 bytes: 38 tokens
    chosen = picker.pick(first, engines)
    engines[chosen].enqueue(first)
    backlog = [ep.prefill_backlog for ep in picker._endpoints]
    assert backlog[chosen] == 38.0 and backlog[1 - chosen] == 0.0
    drain(engines[chosen], picker)
    # The context is held there now; the second request costs little on that engine.
    second = sim_request(2, "system prompt " * 10 + "question two", at=10.0)
    assert picker.pick(second, engines) == chosen
    engines[chosen].enqueue(second)
    assert picker._endpoints[chosen].prefill_backlog == 1.0  # 1 of 38 blocks-worth unheld
    drain(engines[chosen], picker, 10.0)
    third = picker.pick(sim_request(3, "x" * 8, at=20.0), engines)  # a look at the engines
    # The second's first token took its token off; only the third's 2 remain where it went.
    assert [ep.prefill_backlog for ep in picker._endpoints] == [
        2.0 if i == third else 0.0 for i in range(2)]


def test_every_kvroute_contender_is_a_simulator_picker_with_its_policy() -> None:
    from kvroute_api.route_policy import ScoringSpec
    from kvroute_bench.contenders import KVROUTE_VARIANTS
    from kvroute_bench.sim.run import SIM_PICKERS
    from kvroute_router.plugins.load_headroom import LoadHeadroomFilter

    assert {f"kvroute-{name}" for name in KVROUTE_VARIANTS} <= set(SIM_PICKERS)
    default = make_picker("kvroute-precise-cost", 16)
    q16 = make_picker("kvroute-precise-cost-q16", 16)
    w5 = make_picker("kvroute-precise-cost-w5", 16)
    assert isinstance(default, RouterPicker) and isinstance(q16, RouterPicker)
    assert isinstance(w5, RouterPicker)
    assert default.precise and [s.type_name for s in default.profile.scorers] == [
        "prefix-precise", "prefill-cost", "running-requests"]
    assert KVROUTE_VARIANTS["precise-cost"].scoring == [  # the contender is the API default
        s.model_dump(by_alias=True) for s in ScoringSpec().scorers]

    def queue_depth(picker: RouterPicker) -> float:
        return next(f.max_waiting for f in picker.profile.filters
                    if isinstance(f, LoadHeadroomFilter))

    # The contender's spec.admission reaches the simulated profile's filter.
    assert (queue_depth(default), queue_depth(q16)) == (8, 16)
    costs = [s for s in w5.profile.scorers if s.type_name == "prefill-cost"]
    assert costs[0].scorer.miss_weight == 5  # type: ignore[attr-defined]


def test_recompute_breakdown_names_why_a_block_was_computed_again() -> None:
    from kvroute_bench.sim.fleet import recompute_breakdown

    def done(rid: int, engine: int, at: float, first: float, hashes: list[int],
             cached_blocks: int = 0) -> SimRequest:
        return SimRequest(id=rid, arrival_s=at, prompt_tokens=len(hashes) * 4 + 1,
                          max_tokens=1, hashes=hashes, engine=engine, admitted_s=at,
                          first_token_s=first, cached_tokens=cached_blocks * 4)

    requests = [
        done(1, 0, 0.0, 1.0, [1, 2, 3]),          # first time: the oracle misses too
        done(2, 1, 0.5, 1.5, [1, 2, 3]),          # engine 0 still computing: in flight
        done(3, 0, 2.0, 2.5, [1, 2, 3, 4], 1),    # 1 hit; 2, 3 evicted from engine 0; 4 new
        done(4, 2, 3.0, 3.5, [1, 2, 9]),          # 1, 2 only elsewhere; 9 new
    ]
    prompt_tokens = sum(r.prompt_tokens for r in requests)
    shares = recompute_breakdown(requests, 4)
    assert shares == {"in_flight": round(12 / prompt_tokens, 4),
                      "evicted": round(8 / prompt_tokens, 4),
                      "elsewhere": round(8 / prompt_tokens, 4)}


def test_placement_judges_a_decision_by_what_the_engines_held() -> None:
    from kvroute_bench.sim.fleet import placement_class

    engines = [SimEngine(i, cpu_test_engine(384)) for i in range(3)]
    for engine, blocks in zip(engines, ([1, 2], [1, 2, 3], [7]), strict=True):
        engine.refcount.update(dict.fromkeys(blocks, 0))
    assert placement_class(engines, 1, [1, 2, 3, 4]) == "on_holder"
    assert placement_class(engines, 0, [1, 2, 3, 4]) == "left_holder"  # 1 holds a longer run
    assert placement_class(engines, 2, [1, 2, 3, 4]) == "left_holder"  # a block, not the first
    assert placement_class(engines, 2, [5, 1]) == "held_nowhere"


def test_placement_tells_a_sticky_picker_from_round_robin() -> None:
    from kvroute_bench.workloads import build_params

    trace = generate(build_params("precise-prefix", {"tenants": "8", "context_tokens": "400"},
                                  requests=200, rate=50, seed=1, max_context=4096))
    profile = cpu_test_engine(384)
    shares = {}
    for name in ("group-affinity", "round-robin"):
        requests = to_sim_requests(trace.requests, profile.block_size)
        result = simulate(requests, 4, profile, make_picker(name, 16, trace.requests),
                          warmup=50)
        assert sum(result.placement.values()) == pytest.approx(1.0, abs=1e-3)
        shares[name] = result.placement
    # Each tenant on one engine: after the warm-up it is always on its holder.
    assert shares["group-affinity"]["left_holder"] == 0.0
    assert shares["group-affinity"]["on_holder"] > 0.9
    # Round-robin often sends a request away from the engine holding most of its prompt.
    assert shares["round-robin"]["left_holder"] > 0.3


def test_group_affinity_reference_keeps_each_tenant_on_one_engine_spread_evenly() -> None:
    from kvroute_bench.sim.fleet import GroupAffinityPicker
    from kvroute_bench.workloads import build_params

    trace = generate(build_params("precise-prefix", {"tenants": "8", "context_tokens": "400"},
                                  requests=200, rate=50, seed=1, max_context=4096))
    picker = make_picker("group-affinity", 16, trace.requests)
    assert isinstance(picker, GroupAffinityPicker)
    profile = cpu_test_engine(384)
    requests = to_sim_requests(trace.requests, profile.block_size)
    simulate(requests, 4, profile, picker)
    engines_of: dict[str, set[int]] = {}
    for request, sim in zip(trace.requests, requests, strict=True):
        engines_of.setdefault(request.group, set()).add(sim.engine)
    assert all(len(engines) == 1 for engines in engines_of.values())
    per_engine = [sum(1 for e in engines_of.values() if engine in e) for engine in range(4)]
    assert per_engine == [2, 2, 2, 2]
    with pytest.raises(SystemExit):
        make_picker("group-affinity@100", 16)


def test_priority_engines_get_the_routers_priority_from_the_precise_match() -> None:
    """With the engines on priority scheduling, each request carries the priority the router
    writes into its body: arrival ms plus prefillPriorityMsPerToken per prompt token the
    chosen engine does not hold (exact, from the precise match in whole blocks)."""
    scoring = {**PRECISE, "prefillPriorityMsPerToken": 2.0}
    picker = RouterPicker(scoring, block_size=PROFILE.block_size, precise=True,
                          engine_priority=True)
    engine = SimEngine(0, PROFILE, scheduling_policy="priority")
    first = sim_request(1, "system prompt " * 10 + "question one", at=1.5)
    picker.pick(first, [engine])
    assert first.priority == 1500 + 2 * 4 * len(first.hashes)  # nothing held: every block
    engine.enqueue(first)
    drain(engine, picker)
    second = sim_request(2, "system prompt " * 10 + "question two", at=3.0)
    picker.pick(second, [engine])
    assert second.priority == 3000 + 2 * 4 * (len(second.hashes) - 37)  # 37 blocks held
    # A third request for the same context while a fourth computes a new one: the fourth is
    # ranked after the request computing the blocks it holds only as pending (the director's
    # rule), until that one answers.
    leader = sim_request(4, "another context " * 10 + "question", at=5.0)
    picker.pick(leader, [engine])
    engine.enqueue(leader)
    follower = sim_request(5, "another context " * 10 + "question two", at=5.001)
    picker.pick(follower, [engine])
    assert follower.priority == leader.priority + 1
    drain(engine, picker)
    after = sim_request(6, "another context " * 10 + "question three", at=9.0)
    picker.pick(after, [engine])
    assert after.priority < 9000 + 2 * 4 * len(after.hashes) // 2  # held (published) now
    fcfs = RouterPicker(scoring, block_size=PROFILE.block_size, precise=True)
    third = sim_request(3, "another prompt", at=4.0)
    fcfs.pick(third, [SimEngine(0, PROFILE)])
    assert third.priority == 0  # FCFS engines: the router sets none


def test_synced_replicas_rank_a_follower_after_the_leader_another_replica_sent() -> None:
    """Replica sync's computes records in the simulator: replica 1's request for the context
    replica 0's request is computing holds it as pending (shared marks) and is ranked one
    after it (shared in-flight prefix) instead of by its own small penalty, ahead of it; both
    replicas forget the prefix once it answered."""
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    scoring = {**PRECISE, "prefillPriorityMsPerToken": 2.0}
    picker = ReplicatedPicker(lambda seed: RouterPicker(scoring, block_size=PROFILE.block_size,
                                                        precise=True, engine_priority=True,
                                                        seed=seed),
                              2, "pending")
    engine = SimEngine(0, PROFILE, scheduling_policy="priority")
    leader = sim_request(1, "another context " * 10 + "question", at=5.0)
    picker.pick(leader, [engine])
    engine.enqueue(leader)
    first = leader.hashes[0]
    assert all(first in r._endpoints[0].prefill_in_flight for r in picker.replicas)
    follower = sim_request(2, "another context " * 10 + "question two", at=5.001)
    picker.pick(follower, [engine])
    assert follower.priority == leader.priority + 1  # its own: 5001 + 2 ms x 4 tokens
    engine.enqueue(follower)
    drain(engine, picker.replicas[0])
    for k, replica in enumerate(picker.replicas):
        picker.pick(sim_request(3 + k, f"unrelated prompt {k}", at=9.0 + k), [engine])
        assert first not in replica._endpoints[0].prefill_in_flight


@pytest.mark.parametrize("scrape_interval_s", [0.0, 0.1])
def test_the_routers_admission_queue_holds_arrivals_while_every_engine_is_saturated(
        scrape_interval_s: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst on two engines with ``saturationQueueDepth`` 2: the router holds what the
    engines have no room for and lets it go as they finish, so an engine's queue never passes
    the threshold (the router's estimate, the last scrape plus the dispatches since, is never
    below it); every request is answered and the queue ends empty."""
    deepest: list[int] = []
    enqueue = SimEngine.enqueue

    def recording(engine: SimEngine, request: SimRequest) -> None:
        enqueue(engine, request)
        deepest.append(len(engine.waiting))

    monkeypatch.setattr(SimEngine, "enqueue", recording)
    profile = cpu_test_engine()
    trace = generate(ChatParams(requests=40, rate=1000.0))
    picker = RouterPicker({"scorers": [{"type": "queue-depth", "weight": 1.0}]},
                          block_size=profile.block_size, scrape_interval_s=scrape_interval_s,
                          admission={"saturationQueueDepth": 2})
    result = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True),
                      pods=2, profile=profile, picker=picker)
    assert result.unfinished == 0 and not picker.held
    assert max(deepest) <= 2
    unqueued = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True),
                        pods=2, profile=profile, picker=RouterPicker(
                            {"scorers": [{"type": "queue-depth", "weight": 1.0}]},
                            block_size=profile.block_size, scrape_interval_s=scrape_interval_s,
                            admission={"saturationQueueDepth": 2}, admission_queue=False))
    assert unqueued.unfinished == 0 and max(deepest) > 2  # the same burst, unheld


def test_a_late_router_queue_lets_the_newest_go_first_at_the_engines_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.admission.newestFirstAfterMs in the simulator: first come first served without it
    (requests reach the engines in arrival order); with it, once the queue is late the newest
    go first, with an engine priority below every arrival-ranked one (as the router's
    ``LLMRequest.newest_first``)."""
    reached: list[tuple[int, int]] = []
    enqueue = SimEngine.enqueue

    def recording(engine: SimEngine, request: SimRequest) -> None:
        reached.append((request.id, request.priority))
        enqueue(engine, request)

    monkeypatch.setattr(SimEngine, "enqueue", recording)
    profile = cpu_test_engine()
    trace = generate(ChatParams(requests=40, rate=1000.0))
    for after in (None, 0):
        reached.clear()
        picker = RouterPicker({"scorers": [{"type": "queue-depth", "weight": 1.0}]},
                              block_size=profile.block_size, engine_priority=True,
                              admission={"saturationQueueDepth": 2,
                                         "newestFirstAfterMs": after})
        result = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True),
                          pods=2, profile=profile, picker=picker, scheduling_policy="priority")
        assert result.unfinished == 0 and not picker.held
        ids = [rid for rid, _ in reached]
        if after is None:
            assert ids == sorted(ids) and all(p >= 0 for _, p in reached)
        else:
            assert ids != sorted(ids)
            late = [(rid, p) for rid, p in reached if p < 0]
            assert late  # let go newest-first: ahead of the arrival-ranked at the engine
            assert any(rid > later for (rid, _), (later, _) in itertools.pairwise(late))


def test_newest_first_work_is_its_own_backlog_only_at_priority_engines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``Director.dispatch``: a request the late queue let go newest-first adds its prompt
    to the endpoint's newest-first backlog too (what ``prefill-cost`` counts for the next such
    request) when the engines rank by priority, and only then."""
    counted: list[tuple[bool, float, float]] = []
    add = Endpoint.add_prefill_backlog

    def recording(endpoint: Endpoint, tokens: float, newest_first: bool = False) -> None:
        add(endpoint, tokens, newest_first)
        counted.append((newest_first, endpoint.prefill_backlog,
                        endpoint.prefill_backlog_newest_first))

    monkeypatch.setattr(Endpoint, "add_prefill_backlog", recording)
    profile = cpu_test_engine()
    trace = generate(ChatParams(requests=40, rate=1000.0))
    for priority in (True, False):
        counted.clear()
        picker = RouterPicker({"scorers": [{"type": "prefill-cost", "weight": 1.0}]},
                              block_size=profile.block_size, engine_priority=priority,
                              admission={"saturationQueueDepth": 2, "newestFirstAfterMs": 0})
        result = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True),
                          pods=2, profile=profile, picker=picker,
                          scheduling_policy="priority" if priority else "fcfs")
        assert result.unfinished == 0
        flags = {newest for newest, _, _ in counted}
        assert flags == ({True, False} if priority else {False})
        assert all(part <= whole for _, whole, part in counted)


def test_each_replica_queues_its_own_arrivals_and_releases_what_it_finds_room_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three replicas behind round-robin, each with its own admission queue, on two engines
    with ``saturationQueueDepth`` 2: every replica queues some of its own arrivals, every
    arrival is answered and every queue ends empty. Sharing nothing, each replica fills the
    room it sees between scrapes, so the engines' queues reach three times the threshold;
    with replica sync (``"all"``) each counts the others' dispatches and they stay near it
    (one over: a replica takes every completion off its count, as the router does)."""
    from kvroute_bench.sim.router_picker import ReplicatedPicker

    deepest: list[int] = []
    enqueue = SimEngine.enqueue

    def recording(engine: SimEngine, request: SimRequest) -> None:
        enqueue(engine, request)
        deepest.append(len(engine.waiting))

    held: set[int] = set()
    hold = RouterPicker.hold

    def counting(picker: RouterPicker, request: SimRequest,
                 engines: list[SimEngine]) -> bool:
        kept = hold(picker, request, engines)
        if kept:
            held.add(id(picker))
        return kept

    monkeypatch.setattr(SimEngine, "enqueue", recording)
    monkeypatch.setattr(RouterPicker, "hold", counting)
    profile = cpu_test_engine()
    trace = generate(ChatParams(requests=60, rate=1000.0))
    queue_depth: dict[str, int] = {}
    for shared in ("", "all"):
        deepest.clear()
        held.clear()
        picker = ReplicatedPicker(lambda seed: RouterPicker(
            {"scorers": [{"type": "queue-depth", "weight": 1.0}]},
            block_size=profile.block_size, scrape_interval_s=0.1,
            admission={"saturationQueueDepth": 2}, seed=seed), 3, shared)
        result = simulate(to_sim_requests(trace.requests, profile.block_size, keep_text=True),
                          pods=2, profile=profile, picker=picker)
        assert result.unfinished == 0 and not any(r.held for r in picker.replicas)
        assert held == {id(r) for r in picker.replicas}
        # replica sync counts the replicas; each lets go its share of the room
        assert {r.admission.replicas() if r.admission and r.admission.replicas else 1
                for r in picker.replicas} == {3 if shared else 1}
        queue_depth[shared] = max(deepest)
    assert queue_depth[""] >= 3 * 2 and queue_depth["all"] <= 2 + 1


def test_synced_replicas_use_the_replicas_miss_weight() -> None:
    """The simulator's replicas with replica sync (``/xNshared``) count each other as the
    router's replica sync does, so prefill-cost weighs a miss by prefillMissWeightReplicas;
    replicas without sync, and one router, by prefillMissWeight."""
    from kvroute_bench.sim.router_picker import ReplicatedPicker
    from kvroute_router.plugins.prefill_cost import PrefillCostScorer

    def weights(name: str) -> list[float]:
        picker = make_picker(name, 32)
        if isinstance(picker, ReplicatedPicker):
            routers = picker.replicas
        else:
            assert isinstance(picker, RouterPicker)
            routers = [picker]
        return [w.scorer.weight() for r in routers for w in r.profile.scorers
                if isinstance(w.scorer, PrefillCostScorer)]

    assert weights("kvroute-precise-cost@100/x3shared~1") == [10.0] * 3
    assert weights("kvroute-precise-cost-rw3@100/x3shared~1") == [3.0] * 3
    assert weights("kvroute-precise-cost@100/x3") == [3.0] * 3
    assert weights("kvroute-precise-cost@100") == [3.0]

"""The simulated engine: batching, chunked prefill, prefix reuse, LRU eviction, events.

Tests whose block arithmetic counts a request's output at admission pin the reserved model
(``kv_allocation="reserve"``); the default, vLLM's on-demand allocation with preemption, has
its own tests in tests/unit/emulator/test_preemption.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kvroute_bench.sim.fleet import RoundRobinPicker, simulate, to_sim_requests, ttft_by_class
from kvroute_bench.workloads import ChatParams, generate
from kvroute_emulator.model.engine import SimEngine, SimRequest, block_hashes
from kvroute_emulator.model.profile import CostProfile, cpu_test_engine, h100_llama8b

CALIBRATION = Path(__file__).resolve().parents[4] / "shared" / "data" / "calibration" / \
    "h100-llama8b-shape.json"

PROFILE = CostProfile(name="test", prefill_s_per_token=0.001, step_base_s=0.01,
                      decode_step_s_by_batch={1: 0.01, 8: 0.02}, max_num_seqs=4,
                      max_batched_tokens=64, block_size=4, kv_blocks=40)


def request(rid: int, tokens: bytes, max_tokens: int = 2, at: float = 0.0) -> SimRequest:
    return SimRequest(id=rid, arrival_s=at, prompt_tokens=len(tokens), max_tokens=max_tokens,
                      hashes=block_hashes(tokens, PROFILE.block_size))


def _hashes(events: list[dict[str, Any]], kind: str) -> list[int]:
    """The block hashes of every ``kind`` event (``BlockStored``, ``BlockRemoved``), in order."""
    return [h for e in events if e["type"] == kind for h in e["block_hashes"]]


def run_until_idle(engine: SimEngine, start: float = 0.0, max_steps: int = 1000) -> float:
    now = start
    for _ in range(max_steps):
        plan = engine.plan_step(now)
        if plan is None:
            return now
        now += engine.step_duration(plan)
        engine.finish_step(plan, now)
    raise AssertionError("engine did not go idle")


def test_block_hashes_chain_and_cover_only_full_blocks() -> None:
    a = block_hashes(b"abcdefgh12", 4)
    b = block_hashes(b"abcdXXgh", 4)
    assert len(a) == 2 and len(b) == 2
    assert a[0] == b[0] and a[1] != b[1]
    assert block_hashes(b"zzzzefgh", 4)[1] != a[1]  # same tokens, other parent


def test_decode_cost_interpolates_and_extrapolates() -> None:
    assert PROFILE.decode_step_s(0) == 0.0
    assert PROFILE.decode_step_s(1) == pytest.approx(0.01)
    assert PROFILE.decode_step_s(4) == pytest.approx(0.01 + 3 / 7 * 0.01)
    assert PROFILE.decode_step_s(15) == pytest.approx(0.03)
    assert PROFILE.step_s(0, 0) == 0.0
    assert PROFILE.step_s(10, 1) == pytest.approx(0.01 + 0.01 + 0.01)


def test_second_request_with_the_same_prefix_hits_the_cache() -> None:
    engine = SimEngine(0, PROFILE)
    engine.enqueue(request(1, b"a" * 20 + b"x"))
    run_until_idle(engine)
    stored = engine.drain_events()
    assert stored[0]["type"] == "BlockStored" and len(stored[0]["block_hashes"]) == 5
    second = request(2, b"a" * 20 + b"y")
    engine.enqueue(second)
    run_until_idle(engine)
    assert second.cached_tokens == 20
    assert engine.prefix_queries == 42 and engine.prefix_hits == 20
    assert engine.metrics()["vllm:request_success_total"] == 2.0


def test_an_exact_repeat_still_computes_its_last_token() -> None:
    engine = SimEngine(0, PROFILE)
    engine.enqueue(request(1, b"b" * 16))
    run_until_idle(engine)
    again = request(2, b"b" * 16)
    engine.enqueue(again)
    run_until_idle(engine)
    assert again.cached_tokens == 12


def test_requests_admitted_in_one_step_share_the_blocks_it_schedules() -> None:
    """vLLM caches a block when the step that fills it is scheduled: of identical prompts
    admitted together the first computes the prefix and the rest hit it. The blocks are
    announced once, when the step ends."""
    engine = SimEngine(0, PROFILE)
    same = [request(i, b"s" * 12 + bytes([i]), max_tokens=1) for i in range(3)]  # 3 blocks
    for r in same:
        engine.enqueue(r)
    plan = engine.plan_step(0.0)
    assert plan is not None and [r for r, _ in plan.prefill] == same
    assert [r.cached_tokens for r in same] == [0, 12, 12]
    assert plan.prefill_tokens == 13 + 1 + 1
    assert engine.drain_events() == []  # published when the step ends
    engine.finish_step(plan, engine.step_duration(plan))
    assert _hashes(engine.drain_events(), "BlockStored") == same[0].hashes
    assert engine.prefix_hits == 24


def test_a_request_admitted_mid_prefill_hits_the_chunk_scheduled_with_it() -> None:
    """Running requests are scheduled (and their next chunk's blocks cached) before waiting
    ones are admitted: a copy that arrives while a long prefill is in chunks hits the chunk
    computed in the same step, and computes only what the budget leaves after it."""
    engine = SimEngine(0, PROFILE)  # 64 tokens a step
    first = request(1, b"p" * 100, max_tokens=1)  # 25 blocks: chunks of 64 and 36
    engine.enqueue(first)
    plan = engine.plan_step(0.0)
    assert plan is not None
    engine.finish_step(plan, 1.0)
    copy = request(2, b"p" * 100, max_tokens=1, at=1.0)
    engine.enqueue(copy)
    plan = engine.plan_step(1.0)
    assert plan is not None and plan.prefill == [(first, 36), (copy, 4)]
    assert copy.cached_tokens == 96  # all 24 full blocks, the second chunk's 9 among them


def test_long_prompts_are_prefilled_in_chunks_and_ttft_follows() -> None:
    engine = SimEngine(0, PROFILE)
    r = request(1, b"c" * 100, max_tokens=3)
    engine.enqueue(r)
    steps = 0
    now = 0.0
    while (plan := engine.plan_step(now)) is not None:
        assert plan.prefill_tokens + len(plan.decode) <= PROFILE.max_batched_tokens
        now += engine.step_duration(plan)
        engine.finish_step(plan, now)
        steps += 1
    assert steps == 2 + 2  # 64 + 36 prompt tokens, then two more decode steps
    assert r.first_token_s is not None and r.done_s == pytest.approx(now)
    assert r.done_s is not None and r.first_token_s < r.done_s


def test_max_num_seqs_limits_the_batch() -> None:
    engine = SimEngine(0, PROFILE)
    for i in range(6):
        engine.enqueue(request(i, bytes([65 + i]) * 8, max_tokens=1))
    plan = engine.plan_step(0.0)
    assert plan is not None and len(plan.prefill) == 4
    assert engine.metrics()["vllm:num_requests_waiting"] == 2.0


def test_lru_eviction_frees_the_oldest_unpinned_blocks() -> None:
    engine = SimEngine(0, PROFILE)  # 40 blocks of 4 tokens
    first = request(1, b"p" * 64, max_tokens=1)  # 16 blocks + 1 output block
    second = request(2, b"q" * 64, max_tokens=1)
    engine.enqueue(first)
    run_until_idle(engine)
    engine.enqueue(second)
    run_until_idle(engine)
    engine.drain_events()
    third = request(3, b"r" * 64, max_tokens=1)  # needs 17: evicts from "p" (the oldest)
    engine.enqueue(third)
    run_until_idle(engine)
    events = engine.drain_events()
    removed = _hashes(events, "BlockRemoved")
    assert removed and set(removed) <= set(first.hashes)
    assert not set(removed) & set(second.hashes)
    assert engine.metrics()["vllm:kv_cache_usage_perc"] == 0.0  # nothing pinned when idle


def test_a_finished_request_is_evicted_last_block_first() -> None:
    """vLLM frees a request's blocks in reverse: its tail goes first and a context evicted in
    part keeps its leading blocks, still a hit (first block first, block 0 went and every hit
    with it)."""
    engine = SimEngine(0, PROFILE, kv_allocation="reserve")  # 40 blocks of 4 tokens
    first = request(1, b"p" * 64, max_tokens=1)  # 16 cached blocks, 17 reserved
    engine.enqueue(first)
    run_until_idle(engine)
    engine.drain_events()
    second = request(2, b"q" * 104, max_tokens=1)  # 27 blocks: 24 free, 3 evicted
    engine.enqueue(second)
    run_until_idle(engine)
    assert _hashes(engine.drain_events(), "BlockRemoved") == first.hashes[::-1][:3]
    again = request(3, b"p" * 64, max_tokens=1)
    engine.enqueue(again)
    run_until_idle(engine)
    assert again.cached_tokens == 13 * 4


def test_output_blocks_are_cached_once_their_tokens_are_computed() -> None:
    """As in vLLM: a block of generated tokens is cached (and announced) once full; the last
    token's KV is never computed, so (prompt + output - 1) // block_size blocks remain."""
    engine = SimEngine(0, PROFILE)
    r = request(1, b"o" * 10, max_tokens=8)  # 10 + 7 = 17 tokens: 4 full blocks
    engine.enqueue(r)
    run_until_idle(engine)
    stored = _hashes(engine.drain_events(), "BlockStored")
    assert stored[:2] == r.hashes and len(stored) == 4 and r.blocks == stored
    assert len(set(stored)) == 4  # output blocks get ids of their own
    given = SimRequest(id=2, arrival_s=0.0, prompt_tokens=10, max_tokens=8,
                       hashes=block_hashes(b"g" * 10, 4), output_hashes=[101, 102])
    engine.enqueue(given)
    run_until_idle(engine)
    stored = _hashes(engine.drain_events(), "BlockStored")
    assert stored == [*given.hashes, 101, 102]
    assert engine.metrics()["vllm:kv_cache_usage_perc"] == 0.0  # nothing pinned when idle


def test_a_request_that_does_not_fit_leaves_the_lru_order_alone() -> None:
    """Admission checks for room before it touches the hits (vLLM does), so a request that
    waits does not make the blocks it would hit the most recently used."""
    engine = SimEngine(0, PROFILE, kv_allocation="reserve")  # 40 blocks
    old = request(1, b"a" * 32, max_tokens=1)  # 8 blocks, the oldest
    newer = request(2, b"b" * 32, max_tokens=1)
    for r in (old, newer):
        engine.enqueue(r)
        run_until_idle(engine)
    big = request(3, b"c" * 80, max_tokens=8)  # 22 blocks, runs a while
    engine.enqueue(big)
    plan = engine.plan_step(0.0)
    assert plan is not None
    engine.finish_step(plan, 1.0)
    waits = request(4, b"a" * 32 + b"d" * 40, max_tokens=8)  # hits "a", needs 12: 10 room
    engine.enqueue(waits)
    plan = engine.plan_step(1.0)
    assert plan is not None and waits.admitted_s is None
    engine.finish_step(plan, 2.0)
    assert engine.abort(waits)  # its client gave up, between steps
    run_until_idle(engine, start=2.0)
    engine.drain_events()
    filler = request(5, b"e" * 40, max_tokens=1)  # 11 blocks: 3 free, 8 evicted
    engine.enqueue(filler)
    run_until_idle(engine, start=10.0)
    # "a" was still the oldest
    assert set(_hashes(engine.drain_events(), "BlockRemoved")) == set(old.hashes)


def test_requests_wait_for_kv_capacity_instead_of_overcommitting() -> None:
    """Reserved KV (prompt and output at admission): a request that does not fit waits. On
    demand, it is admitted and a sequence is preempted instead (test_preemption.py)."""
    engine = SimEngine(0, PROFILE, kv_allocation="reserve")
    engine.enqueue(request(1, b"s" * 120, max_tokens=8))  # 32 blocks
    engine.enqueue(request(2, b"t" * 60, max_tokens=8))  # 17 blocks: must wait
    plan = engine.plan_step(0.0)
    assert plan is not None and len(plan.prefill) == 1
    assert engine.metrics()["vllm:kv_cache_usage_perc"] == pytest.approx(32 / 40)
    run_until_idle(engine)
    assert engine.finished == 2


def test_fleet_round_robin_on_a_chat_trace() -> None:
    trace = generate(ChatParams(requests=60, rate=2.0))
    profile = cpu_test_engine()
    result = simulate(to_sim_requests(trace.requests, profile.block_size), pods=2,
                      profile=profile, picker=RoundRobinPicker())
    assert result.unfinished == 0
    assert result.requests_per_engine == [30, 30]
    assert 0.0 < result.prefix_hit_rate < 1.0
    assert result.ttft_p50_s <= result.ttft_p99_s


def _timed(i: int, arrival: float, admitted: float, first: float) -> SimRequest:
    return SimRequest(id=i, arrival_s=arrival, prompt_tokens=64, max_tokens=1, hashes=[],
                      admitted_s=admitted, first_token_s=first, done_s=first)


def test_ttft_by_class_names_what_the_tail_is_made_of() -> None:
    # Group a: its first request answers at 1.0 s; b arrives before that (a follower) and c
    # after (later). Group b: one request. The run's p90 falls between 0.9 s and 2.0 s, so
    # only the follower is in the tail.
    requests = [_timed(0, 0.0, 0.1, 1.0), _timed(1, 0.5, 1.0, 2.5), _timed(2, 1.2, 1.2, 1.3),
                _timed(3, 1.5, 1.5, 1.6)]
    by_class = ttft_by_class(requests, ["a", "a", "a", "b"])
    assert {name: row["requests"] for name, row in by_class.items()} == {
        "first": 2, "follower": 1, "later": 1}
    assert by_class["follower"]["ttft_p50_s"] == 2.0
    assert by_class["follower"]["queue_p50_s"] == 0.5
    assert by_class["follower"]["tail_share"] == 1.0
    assert by_class["first"]["tail_share"] == 0.0
    assert by_class["first"]["ttft_p50_s"] == pytest.approx(0.55)
    # a first request that never answered: every other request of its group follows it
    unanswered = [SimRequest(id=0, arrival_s=0.0, prompt_tokens=64, max_tokens=1, hashes=[]),
                  _timed(1, 5.0, 5.0, 5.5)]
    by_class = ttft_by_class(unanswered, ["a", "a"])
    assert by_class["follower"]["requests"] == 1
    assert by_class["first"]["ttft_p50_s"] is None
    # the input order does not matter: a group's first request is its earliest arrival
    shuffled = ttft_by_class(list(reversed(requests)), ["b", "a", "a", "a"])
    assert shuffled == ttft_by_class(requests, ["a", "a", "a", "b"])
    with pytest.raises(ValueError, match="2 requests but 1 groups"):
        ttft_by_class(unanswered, ["a"])


def test_a_continuous_warm_up_runs_but_is_not_counted() -> None:
    """``simulate(..., warmup=N)``: the first N arrivals (by arrival time, not list order) load
    the caches and queues but stay out of latencies, hits and recomputation."""
    shared = b"0123456789abcdef" * 2
    def trace() -> list[SimRequest]:  # listed out of arrival order on purpose
        return [request(2, shared + b"qq", at=0.2), request(0, shared + b"xx", at=0.0),
                request(1, shared + b"yy", at=0.1)]
    cold = simulate(trace(), 1, PROFILE, RoundRobinPicker())
    warm_requests = trace()
    warm = simulate(warm_requests, 1, PROFILE, RoundRobinPicker(), warmup=1)
    assert cold.requests == 3 and warm.requests == 2 and warm.unfinished == 0
    # request 0 (the earliest arrival) computed the shared 32 tokens; the two counted
    # requests hit them: 32 of 34 tokens each
    assert warm.prefix_hit_rate == pytest.approx(64 / 68)
    assert cold.prefix_hit_rate < warm.prefix_hit_rate
    counted = [r for r in warm_requests if r.id != 0]
    assert warm.ttft_p99_s <= max(r.ttft_s or 0.0 for r in counted)
    by_class = ttft_by_class(warm_requests, ["g", "g", "g"], warmup=1)
    assert by_class["first"]["requests"] == 0  # the group's first request was the warm-up
    assert by_class["follower"]["requests"] + by_class["later"]["requests"] == 2


def test_the_simulator_honours_a_continuous_warm_up(tmp_path: Path) -> None:
    """``--warmup-mode continuous`` simulates ``--warmup`` more requests and counts the rest;
    the default (drain) has no simulated counterpart and counts every request, as before."""
    from kvroute_cli.main import main

    for mode, name in (("continuous", "c"), ("drain", "d")):
        code = main(["bench", "--sim", "--profile", "h100", "--pods", "2", "--workload", "chat",
                     "--requests", "12", "--warmup", "6", "--warmup-mode", mode, "--rate", "4",
                     "--sim-pickers", "round-robin", "--out", str(tmp_path), "--name", name,
                     "--workdir", str(tmp_path / "wd")])
        assert code == 0
    continuous = json.loads((tmp_path / "c-sim-chat.json").read_text())
    drain = json.loads((tmp_path / "d-sim-chat.json").read_text())
    assert continuous["warmup"] == 6 and drain["warmup"] == 0
    assert continuous["results"][0]["requests"] == 12 and drain["results"][0]["requests"] == 12
    assert sum(continuous["results"][0]["requests_per_engine"]) == 18


def test_fleet_rejects_requests_larger_than_an_engine() -> None:
    big = request(1, b"u" * 400)
    with pytest.raises(ValueError, match="one engine holds 160"):
        simulate([big], pods=1, profile=PROFILE, picker=RoundRobinPicker())


@pytest.mark.skipif(not CALIBRATION.exists(), reason="shared calibration data not present")
def test_h100_profile_reads_the_calibration_file() -> None:
    profile = h100_llama8b(CALIBRATION)
    # ~32k tokens/s at >= 2k tokens; the suffix timing's eager-mode floor is not vLLM's
    assert 1 / profile.prefill_s_per_token == pytest.approx(32_300, rel=0.05)
    assert profile.step_base_s < 0.005
    assert profile.step_s(0, 1) == pytest.approx(0.007, abs=0.005)
    assert profile.step_s(6144, 0) == pytest.approx(0.19, rel=0.1)  # the file's 6k prompt


def test_router_picker_runs_the_routers_own_profile() -> None:
    from kvroute_bench.sim.router_picker import RouterPicker

    picker = RouterPicker({"scorers": [{"type": "prefix-approx", "weight": 1.0}]},
                          block_size=PROFILE.block_size)
    assert [s.type_name for s in picker.profile.scorers] == ["prefix-approx"]
    engines = [SimEngine(i, PROFILE) for i in range(4)]
    shared = "x" * 2000
    first = SimRequest(id=1, arrival_s=0.0, prompt_tokens=2010, max_tokens=1, hashes=[],
                       prompt=shared + "first-tail")
    second = SimRequest(id=2, arrival_s=0.0, prompt_tokens=2011, max_tokens=1, hashes=[],
                        prompt=shared + "second-tail")
    chosen = picker.pick(first, engines)
    # The router remembers where it sent the shared prefix and sends the next one there.
    assert picker.pick(second, engines) == chosen


def test_the_simulator_replays_a_trace_file(tmp_path: Path) -> None:
    """``kvroute bench --sim --trace FILE`` replays the file's requests (its first
    ``--requests``, arrivals scaled by ``--rate``) as ``--fleet`` runs do, so a trace's what-ifs
    take seconds instead of an emulated run."""
    from kvroute_cli.main import main

    trace = Path(__file__).resolve().parents[3] / "bench" / "traces" / \
        "mooncake-toolagent-synth-tiny.jsonl"
    code = main(["bench", "--sim", "--profile", "h100", "--pods", "4", "--trace", str(trace),
                 "--requests", "24", "--rate", "20", "--max-context", "32768",
                 "--sim-pickers", "round-robin,kvroute-precise-cost", "--out", str(tmp_path),
                 "--name", "t", "--workdir", str(tmp_path / "wd")])
    assert code == 0
    data = json.loads((tmp_path / "t-sim-trace-mooncake-toolagent-synth-tiny.json").read_text())
    assert data["workload"] == "trace-mooncake-toolagent-synth-tiny"
    assert data["params"]["trace"] == str(trace)
    results = {row["picker"]: row for row in data["results"]}
    assert set(results) == {"round-robin", "kvroute-precise-cost"}
    assert all(row["requests"] == 24 and row["unfinished"] == 0 for row in results.values())
    # The sessions share prefixes: an oracle above 0, and kvroute finds some of it.
    assert results["kvroute-precise-cost"]["oracle_hit_rate"] > 0
    assert results["kvroute-precise-cost"]["prefix_hit_rate"] > 0


def test_the_simulator_names_a_bad_trace_file(tmp_path: Path) -> None:
    from kvroute_cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"neither": 1}\n')
    with pytest.raises(SystemExit, match=r"--trace .*bad.jsonl: line 1: neither Mooncake"):
        main(["bench", "--sim", "--pods", "2", "--trace", str(bad), "--requests", "4",
              "--out", str(tmp_path), "--workdir", str(tmp_path / "wd")])


class _ScrapeClock(RoundRobinPicker):
    """Round-robin that records when the simulator scrapes for it."""

    scrape_interval_s = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.scrapes: list[float] = []

    def scrape(self, engines: Any, now: float) -> None:
        self.scrapes.append(now)


def test_a_scrape_phase_moves_every_scrape_after_the_first() -> None:
    """An ensemble member's scrapes run at another phase to the arrivals: the first at the
    first arrival (a picker needs a snapshot before its first decision), the rest that share
    of an interval earlier."""
    trace = generate(ChatParams(requests=8, rate=2.0, seed=3))
    profile = cpu_test_engine()
    times = []
    for phase in (0.0, 0.25):
        picker = _ScrapeClock()
        simulate(to_sim_requests(trace.requests, profile.block_size), 2, profile, picker,
                 scrape_phase=phase)
        times.append(picker.scrapes)
    (first, *rest), (first_b, *rest_b) = times
    assert first == first_b == trace.requests[0].arrival_s
    assert rest[0] == pytest.approx(first + 0.1) and rest_b[0] == pytest.approx(first + 0.075)
    assert rest_b[1] - rest_b[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="scrape_phase"):
        simulate(to_sim_requests(trace.requests, profile.block_size), 2, profile,
                 _ScrapeClock(), scrape_phase=1.0)


def test_ensemble_mean_averages_field_by_field() -> None:
    from kvroute_bench.sim.run import ensemble_mean

    runs = [{"p90": 1.0, "per_engine": [2, 4], "by": {"a": 1.0, "b": None}},
            {"p90": 3.0, "per_engine": [4, 8], "by": {"a": 2.0, "b": 0.5}}]
    assert ensemble_mean(runs) == {"p90": 2.0, "per_engine": [3.0, 6.0],
                                   "by": {"a": 1.5, "b": None}}
    assert ensemble_mean(runs[:1]) is runs[0]


def test_the_simulator_reports_an_ensemble_of_runs(tmp_path: Path) -> None:
    """``--sim-ensemble K`` runs a kvroute picker K times (tie-break stream k, scrape phase
    k/K) and reports their mean beside each run; a reference picker (deterministic) runs
    once; K outside 1..64 is refused."""
    from kvroute_cli.main import main

    common = ["bench", "--sim", "--profile", "h100", "--pods", "4", "--workload",
              "precise-prefix", "--requests", "60", "--warmup", "30", "--warmup-mode",
              "continuous", "--rate", "40", "--kv-blocks", "2000", "--set", "max_context=8192",
              "--sim-pickers", "round-robin,kvroute-precise-cost@100",
              "--out", str(tmp_path), "--workdir", str(tmp_path / "wd")]
    assert main([*common, "--sim-ensemble", "3", "--name", "e"]) == 0
    rows = json.loads((tmp_path / "e-sim-precise-prefix.json").read_text())["results"]
    reference, kvroute = rows
    assert "ensemble" not in reference
    runs = kvroute["ensemble"]
    assert [(r["seed"], r["scrape_phase"]) for r in runs] == [(0, 0.0), (1, 1 / 3), (2, 2 / 3)]
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefix_hit_rate"):
        assert kvroute[key] == pytest.approx(sum(r[key] for r in runs) / 3)
    # the first run is the run without an ensemble, exactly
    assert main([*common, "--name", "one"]) == 0
    one = json.loads((tmp_path / "one-sim-precise-prefix.json").read_text())["results"][1]
    assert "ensemble" not in one
    assert one["ttft_p90_s"] == runs[0]["ttft_p90_s"]
    assert one["prefix_hit_rate"] == runs[0]["prefix_hit_rate"]
    for bad in ("0", "65"):
        assert main([*common, "--sim-ensemble", bad, "--name", "bad"]) == 2
    assert not (tmp_path / "bad-sim-precise-prefix.json").exists()

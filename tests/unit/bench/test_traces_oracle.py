"""Trace replay (Mooncake and OpenAI-style JSONL), the precise-prefix workload, the oracle's hit
rate and the time dilation of emulated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvroute_bench.client import request_body, request_path
from kvroute_bench.harness import dilate, undilate
from kvroute_bench.oracle import oracle_hit_rate
from kvroute_bench.stats import RequestResult
from kvroute_bench.traces import MOONCAKE_BLOCK_TOKENS, TraceFormatError, TraceOptions, load
from kvroute_bench.workloads import PrecisePrefixParams, TraceRequest, build_params, generate

TRACES = Path(__file__).resolve().parents[3] / "bench" / "traces"


def _write(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mooncake_equal_hash_ids_are_equal_content(tmp_path: Path) -> None:
    path = _write(tmp_path, [
        {"timestamp": 1000, "input_length": 1100, "output_length": 8, "hash_ids": [1, 2, 3]},
        {"timestamp": 1500, "input_length": 1024, "output_length": 9, "hash_ids": [1, 2]},
        {"timestamp": 2500, "input_length": 700, "output_length": 9, "hash_ids": [4, 2]},
        {"timestamp": 3000, "input_length": 1500, "output_length": 5, "hash_ids": [1]},
    ])
    trace = load(TraceOptions(path, time_scale=0.5))
    a, b, c, d = trace.requests
    assert trace.params["format"] == "mooncake"
    assert [r.arrival_s for r in trace.requests] == [0.0, 0.25, 0.75, 1.0]
    assert [len(r.prompt) for r in trace.requests] == [1100, 1024, 700, 1500]
    assert [r.max_tokens for r in trace.requests] == [8, 9, 9, 5]
    assert a.prompt[:1024] == b.prompt  # ids 1, 2 in both
    assert c.prompt[:MOONCAKE_BLOCK_TOKENS] != a.prompt[:MOONCAKE_BLOCK_TOKENS]  # id 4 != id 1
    # block 2 is the same text wherever it appears
    assert c.prompt[512:700] == a.prompt[512:700]
    assert d.prompt[:512] == a.prompt[:512] and d.prompt[512:] not in a.prompt  # padded
    assert load(TraceOptions(path, time_scale=0.5)).requests == trace.requests  # determinism


def test_openai_trace_chat_and_prompt_requests(tmp_path: Path) -> None:
    path = _write(tmp_path, [
        {"arrival_s": 0.5, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7},
        {"arrival_s": 0.0, "prompt": "plain", "max_tokens": 3},
    ])
    first, second = load(TraceOptions(path)).requests  # sorted by arrival
    assert (first.prompt, first.messages, second.messages) == ("plain", None,
                                                                (("user", "hi"),))
    assert request_path(second) == "/v1/chat/completions"
    assert request_body("m", second)["messages"] == [{"role": "user", "content": "hi"}]
    assert request_path(first) == "/v1/completions"
    assert request_body("m", first)["prompt"] == "plain"


def test_long_prompts_are_cut_to_the_context(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"timestamp": 0, "input_length": 5000, "output_length": 100,
                              "hash_ids": list(range(10))}])
    trace = load(TraceOptions(path, max_context=2048))
    assert len(trace.requests[0].prompt) == 2048 - 8 - 100 and trace.params["clipped"] == 1


@pytest.mark.parametrize("rows, message", [
    ([{"nothing": 1}], "neither"),
    (["text"], "not a JSON object"),
    ([{"timestamp": 0, "input_length": 0, "output_length": 1}], "input_length"),
    ([{"timestamp": -5, "prompt": "x"}], "arrival"),
    ([{"arrival_s": 1, "messages": [{"role": "user"}]}], "messages"),
])
def test_bad_trace_lines_are_named(tmp_path: Path, rows: list[object], message: str) -> None:
    with pytest.raises(TraceFormatError, match=message):
        load(TraceOptions(_write(tmp_path, rows)))


def test_shipped_traces_load() -> None:
    mooncake = load(TraceOptions(TRACES / "mooncake-tiny.jsonl"))
    openai = load(TraceOptions(TRACES / "openai-tiny.jsonl"))
    assert mooncake.params["format"] == "mooncake" and len(mooncake.requests) == 40
    assert openai.params["format"] == "openai" and len(openai.requests) == 30
    assert any(r.messages for r in openai.requests) and any(not r.messages
                                                            for r in openai.requests)


def test_precise_prefix_tenants_fill_the_fleet_kv_share() -> None:
    p = PrecisePrefixParams(fleet_kv_tokens=16 * 30_000 * 16, requests=50)
    assert p.tenant_count() == round(0.7 * 16 * 30_000 * 16 / 6000)
    trace = generate(build_params("precise-prefix", {"tenants": "3"}, requests=60))
    groups = {r.group for r in trace.requests}
    assert groups <= {"tenant-0", "tenant-1", "tenant-2"}
    same = [r for r in trace.requests if r.group == "tenant-1"]
    assert len({r.prompt[:6000] for r in same}) == 1 and len({r.prompt for r in same}) > 1
    assert all(900 < len(r.prompt) - r.shared_tokens < 1600 for r in trace.requests)


def _req(i: int, prompt: str) -> TraceRequest:
    return TraceRequest(index=i, arrival_s=float(i), prompt=prompt, max_tokens=1, group="g",
                        shared_tokens=0)


def test_oracle_counts_every_distinct_block_once() -> None:
    a, b = "a" * 64, "b" * 64
    requests = [_req(0, a + "x" * 10), _req(1, a + b), _req(2, a + b), _req(3, b + a)]
    # block size 32; warm-up = first request (its 2 "a" blocks computed)
    # measured: r1 hits 2 of 4 blocks (64/128), r2 all 4 but the last token rule leaves 3
    # (96/128), r3 shares nothing (its chain starts with b): 0/128
    assert oracle_hit_rate(requests, 1, 32) == pytest.approx((64 + 96 + 0) / 384)
    assert oracle_hit_rate(requests, 4, 32) == 0.0


def test_dilation_round_trip() -> None:
    trace = [_req(0, "x"), _req(1, "y")]
    assert [r.arrival_s for r in dilate(trace, 10.0)] == [0.0, 10.0]
    results = [RequestResult(index=0, sent_s=100.0, first_token_s=102.0, done_s=110.0),
               RequestResult(index=1, sent_s=120.0, first_token_s=121.0, done_s=None)]
    a, b = undilate(results, 10.0)
    assert a.ttft_s == pytest.approx(0.2) and a.e2e_s == pytest.approx(1.0)
    assert b.sent_s == pytest.approx(102.0) and b.ttft_s == pytest.approx(0.1)
    assert b.done_s is None


def test_kvroutes_pending_window_stretches_with_the_emulated_time() -> None:
    from kvroute_api.inference_pool import InferencePool, KVEventsSpec
    from kvroute_bench.contenders import DEFAULT_PENDING_MS, EngineInfo, FleetInfo, kvroute_config

    assert KVEventsSpec().pending_ms == DEFAULT_PENDING_MS  # the router's own default
    engines = [EngineInfo("e0", "http://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3")]
    for scale, expected in ((1.0, 5000), (64.0, 320_000)):
        pool = InferencePool.model_validate(
            kvroute_config(FleetInfo(engines, "m", 16, time_scale=scale), [])[0])
        assert pool.spec.engine.kv_events.pending_ms == expected


def test_kvroute_timeouts_stretch_with_the_emulated_time() -> None:
    from kvroute_api.route_policy import RoutePolicySpec
    from kvroute_bench.contenders import EngineInfo, FleetInfo, kvroute_config

    engines = [EngineInfo("e0", "http://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3")]
    real = kvroute_config(FleetInfo(engines, "m", 16), [])[1]["spec"]
    assert "retries" not in real
    spec = kvroute_config(FleetInfo(engines, "m", 16, time_scale=16.0), [])[1]["spec"]
    parsed = RoutePolicySpec.model_validate(spec)
    assert parsed.retries.per_try_timeout_ms == 160_000
    assert parsed.request_timeout_seconds == 9_600
    assert parsed.scoring.stale_metrics_ms == 48_000  # the scrape period is stretched too
    assert parsed.admission.queue_timeout_ms == 480_000  # admission's 30 s router queue
    assert "admission" not in real
    # A variant's own admission fields merge with the stretched timeout.
    merged = RoutePolicySpec.model_validate(kvroute_config(
        FleetInfo(engines, "m", 16, time_scale=16.0), [],
        {"admission": {"saturationQueueDepth": 100_000}})[1]["spec"])
    assert merged.admission.queue_timeout_ms == 480_000
    assert merged.admission.saturation_queue_depth == 100_000
    # A variant's own per-try timeout is engine time too (30 s: 480 s of wall time at 16).
    longer = RoutePolicySpec.model_validate(kvroute_config(
        FleetInfo(engines, "m", 16, time_scale=16.0), [],
        {"retries": {"perTryTimeoutMs": 30_000}})[1]["spec"])
    assert longer.retries.per_try_timeout_ms == 480_000
    # The prefix wait is engine time too: stretched, the default and a variant's own.
    from kvroute_api.route_policy import ScoringSpec
    from kvroute_bench.contenders import DEFAULT_PREFILL_WAIT_MS, KVROUTE_POLICY_EXTRA

    assert ScoringSpec().prefill_wait_ms == DEFAULT_PREFILL_WAIT_MS  # the router's default
    assert parsed.scoring.prefill_wait_ms == DEFAULT_PREFILL_WAIT_MS * 16
    old_default = RoutePolicySpec.model_validate(kvroute_config(
        FleetInfo(engines, "m", 16, time_scale=16.0), [],
        KVROUTE_POLICY_EXTRA["precise-cost-wait200"])[1]["spec"])
    assert old_default.scoring.prefill_wait_ms == 3_200
    waiting = RoutePolicySpec.model_validate(kvroute_config(
        FleetInfo(engines, "m", 16, time_scale=16.0), [],
        KVROUTE_POLICY_EXTRA["precise-cost-wait"])[1]["spec"])
    assert waiting.scoring.prefill_wait_ms == 32_000
    off = RoutePolicySpec.model_validate(kvroute_config(
        FleetInfo(engines, "m", 16, time_scale=16.0), [],
        KVROUTE_POLICY_EXTRA["precise-cost-nowait"])[1]["spec"])
    assert off.scoring.prefill_wait_ms == 0
    assert waiting.scoring.stale_metrics_ms == 48_000  # merged with, not replacing, scoring
    # The engine-queue penalty per uncached token too; priority engines are declared.
    from kvroute_api.inference_pool import InferencePoolSpec
    from kvroute_bench.contenders import DEFAULT_PRIORITY_MS_PER_TOKEN

    assert ScoringSpec().prefill_priority_ms_per_token == DEFAULT_PRIORITY_MS_PER_TOKEN
    assert parsed.scoring.prefill_priority_ms_per_token == DEFAULT_PRIORITY_MS_PER_TOKEN * 16
    pool_doc, _ = kvroute_config(FleetInfo(engines, "m", 16, scheduling_policy="priority"), [])
    assert InferencePoolSpec.model_validate(pool_doc["spec"]).engine.scheduling_policy == \
        "Priority"
    assert InferencePoolSpec.model_validate(kvroute_config(
        FleetInfo(engines, "m", 16), [])[0]["spec"]).engine.scheduling_policy == "FCFS"


def test_kvroute_scrape_interval_stretches_with_the_emulated_time(tmp_path: Path) -> None:
    from kvroute_bench.contenders import EngineInfo, FleetInfo, _kvroute

    engines = [EngineInfo("e0", "http://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3")]
    real = _kvroute("precise-load")(FleetInfo(engines, "m", 16), 9000, tmp_path)
    assert "--scrape-interval-ms" not in real
    argv = _kvroute("precise-load")(FleetInfo(engines, "m", 16, time_scale=16.0), 9000, tmp_path)
    assert argv[argv.index("--scrape-interval-ms") + 1] == "1600"
    assert argv[argv.index("--accounted-scrape-interval-ms") + 1] == "16000"
    assert argv[argv.index("--idle-scrape-interval-ms") + 1] == "32000"
    fixed = _kvroute("precise-cost-fixed-scrape")(FleetInfo(engines, "m", 16, time_scale=16.0),
                                                  9000, tmp_path)
    assert fixed[fixed.index("--accounted-scrape-interval-ms") + 1] == "1600"
    assert fixed[fixed.index("--idle-scrape-interval-ms") + 1] == "8000"

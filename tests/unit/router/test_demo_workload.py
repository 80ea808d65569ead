"""The demo's trace: seeded, same shape for every contender, disjoint text between them."""

from __future__ import annotations

from kvroute_cli.demo_workload import ContenderResult, RequestResult, build_trace


def test_contenders_get_the_same_shape_and_different_prompts() -> None:
    a = build_trace(7, "round-robin/0", tenants=6, requests=30, prompt_chars=500)
    b = build_trace(7, "kvroute/0", tenants=6, requests=30, prompt_chars=500)
    assert [r.tenant for r in a] == [r.tenant for r in b]
    assert [len(r.messages[1]["content"]) for r in a] == [len(r.messages[1]["content"])
                                                          for r in b]
    systems_a = {r.messages[0]["content"][:60] for r in a}
    systems_b = {r.messages[0]["content"][:60] for r in b}
    assert not systems_a & systems_b
    assert build_trace(7, "kvroute/0", 6, 30, 500) == b
    assert all(len(r.messages[0]["content"]) > 500 for r in a)


def test_summary_quantiles_and_hit_rate() -> None:
    result = ContenderResult("x", [RequestResult(True, t / 10, 1.0) for t in range(1, 11)]
                             + [RequestResult(False, 0.0, 1.0)], wall_s=2.0,
                             prefix_queries=200, prefix_hits=150)
    assert result.ttft_quantile(0.5) == 0.6 and result.throughput == 5.0
    assert result.summary()["prefix_cache_hit_rate"] == 0.75

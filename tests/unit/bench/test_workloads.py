"""The workload generators: seeded, bounded by the context, and shaped as documented."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from kvroute_bench.workloads import (
    CONTEXT_MARGIN,
    WORKLOADS,
    ChatParams,
    HotspotParams,
    LogNormal,
    LowSharingParams,
    RagParams,
    build_params,
    generate,
    make_text,
    poisson_arrivals,
)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_trace_other_seed_other_trace(name: str) -> None:
    a = generate(build_params(name, requests=40))
    b = generate(build_params(name, requests=40))
    c = generate(build_params(name, requests=40, seed=1))
    assert a.requests == b.requests
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_request_fits_the_context_and_is_ascii(name: str) -> None:
    trace = generate(build_params(name, requests=200))
    assert len(trace.requests) == 200
    for r in trace.requests:
        assert r.prompt_tokens + r.max_tokens <= trace.params["max_context"] - CONTEXT_MARGIN
        assert r.prompt.isascii()
        assert r.max_tokens >= 1
        assert 0 <= r.shared_tokens <= r.prompt_tokens
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0


def test_poisson_arrivals_have_the_asked_rate() -> None:
    times = poisson_arrivals(np.random.default_rng(7), rate=4.0, count=4000)
    rate = (len(times) - 1) / times[-1]
    assert 3.7 < rate < 4.3
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(np.random.default_rng(0), rate=0, count=3)


def test_lognormal_draws_stay_clipped() -> None:
    dist = LogNormal(100, 2.0, 10, 300)
    rng = np.random.default_rng(0)
    draws = [dist.draw(rng) for _ in range(500)]
    assert min(draws) == 10 and max(draws) == 300


def test_make_text_is_deterministic_and_exact_length() -> None:
    assert make_text(np.random.default_rng(3), 57) == make_text(np.random.default_rng(3), 57)
    assert len(make_text(np.random.default_rng(3), 57)) == 57
    assert make_text(np.random.default_rng(3), 0) == ""


def test_chat_sessions_grow_and_tenants_share_system_prompts() -> None:
    trace = generate(ChatParams(requests=150))
    by_tenant: dict[str, list[str]] = {}
    for r in trace.requests:
        by_tenant.setdefault(r.group, []).append(r.prompt)
    assert 2 <= len(by_tenant) <= 12
    # Two requests of one tenant share at least the tenant's system prompt (>= 400 tokens).
    for prompts in by_tenant.values():
        if len(prompts) >= 2:
            assert common_prefix(prompts[0], prompts[1]) >= 400
    # Some request continues an earlier one: the whole earlier prompt is its prefix.
    prompts = [r.prompt for r in trace.requests]
    continued = sum(1 for i, p in enumerate(prompts) if any(p.startswith(q) for q in prompts[:i]))
    assert continued > 20
    # Different tenants share nothing beyond the label's fixed opening.
    firsts = [ps[0] for ps in by_tenant.values()]
    assert common_prefix(firsts[0], firsts[1]) < 32


def test_rag_requests_of_one_document_share_it() -> None:
    trace = generate(RagParams(requests=120))
    docs: dict[str, list[str]] = {}
    for r in trace.requests:
        docs.setdefault(r.group, []).append(r.prompt)
    popular = max(docs.values(), key=len)
    assert len(popular) >= 10  # Zipf: the top document is asked often
    assert common_prefix(popular[0], popular[1]) >= 600 + 120
    assert len(docs) > 5


def test_hotspot_is_dominated_by_one_prefix() -> None:
    trace = generate(HotspotParams(requests=400))
    hot = [r for r in trace.requests if r.group == "hot"]
    assert 0.6 < len(hot) / 400 < 0.8
    assert common_prefix(hot[0].prompt, hot[-1].prompt) >= 1000


def test_low_sharing_prompts_share_less_than_a_block() -> None:
    trace = generate(LowSharingParams(requests=100))
    prompts = [r.prompt for r in trace.requests]
    longest = max(common_prefix(a, b) for a in prompts[:30] for b in prompts[:30] if a is not b)
    assert longest < 32
    assert trace.summary()["designed_shared_fraction"] == 0.0


def test_overrides_convert_types_and_name_bad_keys() -> None:
    params = build_params("chat", {"tenants": "4", "system": "500:0.1:100:900",
                                   "tenant-zipf": "1.5"}, requests=10)
    assert isinstance(params, ChatParams)
    assert params.tenants == 4 and params.tenant_zipf == 1.5 and params.requests == 10
    assert params.system == LogNormal(500.0, 0.1, 100, 900)
    with pytest.raises(ValueError, match="no parameter 'bogus'"):
        build_params("chat", {"bogus": "1"})
    with pytest.raises(ValueError, match="MEDIAN:SIGMA:LOW:HIGH"):
        build_params("rag", {"document": "12"})
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        build_params("nope")


def test_params_are_recorded_in_the_trace() -> None:
    trace = generate(build_params("hotspot", requests=5, rate=2.5))
    assert trace.workload == "hotspot"
    assert trace.params["rate"] == 2.5
    assert trace.params == dataclasses.asdict(HotspotParams(requests=5, rate=2.5))

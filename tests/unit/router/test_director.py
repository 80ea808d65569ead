"""The director's request path: resolution, limits, admission hooks, pool choice, scheduling,
in-flight accounting and prefix affinity."""

from __future__ import annotations

import time

import pytest
from kvroute_router.datastore.store import Resolution
from kvroute_router.director import Admission, Decision, Outcome, RoutingError
from kvroute_router.framework.endpoint import MAX_UNSEEN, Endpoint, EndpointMetrics
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.load_headroom import LoadHeadroomFilter

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool, set_metrics

LONG = "You are a helpful assistant. " * 40


async def test_unknown_model_is_404_and_pool_model_resolves_implicitly() -> None:
    director, _ = make_director([make_pool(), make_pool("other", model="other-model")],
                                [make_policy()])
    with pytest.raises(RoutingError) as err:
        await director.route(LLMRequest(model="nope"))
    assert err.value.status == 404 and "chat" in err.value.message
    # A pool no policy targets is reachable by its served name, through a default policy.
    decision = await director.route(LLMRequest(model="other-model", prompt_text="hi"))
    assert decision.policy_key == "implicit/other-model"
    assert decision.pool.name == "other"
    # A pool a policy targets is not (docs/security.md), unless it opts in.
    with pytest.raises(RoutingError) as err:
        await director.route(LLMRequest(model="test-model", prompt_text="hi"))
    assert err.value.status == 404
    director, _ = make_director([make_pool(directAccess=True)], [make_policy()])
    decision = await director.route(LLMRequest(model="test-model", prompt_text="hi"))
    assert decision.policy_key == "implicit/test-model"


async def test_output_and_prompt_limits() -> None:
    policy = make_policy(admission={"maxOutputTokens": 10, "maxPromptTokens": 100})
    director, _ = make_director([make_pool()], [policy])
    with pytest.raises(RoutingError) as err:
        await director.route(LLMRequest(model="chat", max_tokens=11))
    assert err.value.status == 400
    assert err.value.code == "invalid_request_error" and "10" in err.value.message
    with pytest.raises(RoutingError) as err:
        await director.route(LLMRequest(model="chat", prompt_text="x" * 4000))
    assert err.value.status == 413
    assert err.value.code == "context_length_exceeded" and "100" in err.value.message


async def test_same_prefix_sticks_distinct_prefixes_spread() -> None:
    director, store = make_director([make_pool(count=4)], [make_policy()])
    for ep in store.endpoints():
        set_metrics(ep)
    first = await director.route(LLMRequest(model="chat", prompt_text=LONG + "q1"))
    target = first.endpoints[0]
    director.dispatch(first, target)
    for i in range(5):
        again = await director.route(LLMRequest(model="chat", prompt_text=LONG + f"q{i + 2}"))
        assert again.endpoints[0] is target
        assert again.prefix_match_ratio() == pytest.approx(1.0, abs=0.1)
    # Distinct prompts, dispatched and still in flight: they spread over all endpoints.
    used = set()
    for i in range(4):
        d = await director.route(LLMRequest(model="chat", prompt_text=f"{i}" * 2000))
        director.dispatch(d, d.endpoints[0])
        used.add(d.endpoints[0].name)
    assert len(used) >= 3


async def test_in_flight_counts_immediately_and_finish_releases() -> None:
    director, _store = make_director([make_pool(count=2)], [make_policy()])
    decision = await director.route(LLMRequest(model="chat", prompt_text="a"))
    ep = decision.endpoints[0]
    director.dispatch(decision, ep)
    assert ep.in_flight == 1 and ep.dispatched_since_scrape == 1
    director.end_attempt(decision, ep)
    director.finish(decision, ep, Outcome(status=200, e2e_s=0.1))
    director.finish(decision, ep, Outcome(status=200))  # idempotent
    assert ep.in_flight == 0
    text = director.metrics.registry.get_sample_value(
        "kvroute_requests_total", {"policy": "chat", "pool": "local", "endpoint": ep.name,
                                   "status": "200"})
    assert text == 1.0


async def test_an_answering_request_is_not_counted_as_waiting() -> None:
    """A dispatch after the engine's last page counts as waiting only until its first byte:
    its prompt is computed then. Counted until its end, a page one accounted period (1 s)
    old showed every dispatch of that period as waiting, and the load-headroom filter and
    admission took the engines scraped longest ago for hot spots (emulated-fleet round 50)."""
    director, _store = make_director([make_pool(count=1)], [make_policy()])
    (ep,) = _store.endpoints()
    first = await director.route(LLMRequest(model="chat", prompt_text="a"))
    second = await director.route(LLMRequest(model="chat", prompt_text="b"))
    director.dispatch(first, ep)
    director.dispatch(second, ep)
    assert ep.waiting_estimate() == 2
    director.answering(first, ep, first_byte=True)
    assert ep.waiting_estimate() == 1 and ep.running_estimate() == 2
    director.end_attempt(first, ep)  # taken off at its first byte already
    assert ep.waiting_estimate() == 1 and ep.in_flight == 1
    director.end_attempt(second, ep)  # failed before answering
    assert ep.waiting_estimate() == 0 and ep.in_flight == 0


async def test_a_first_byte_of_a_request_the_page_showed_leaves_the_newer_dispatches_counted(
        ) -> None:
    """An engine's waiting count is its page's, less this router's requests the page may show
    that answered since, plus the dispatches after the page that have not answered. One count
    for both (before round 52) took the first byte of a request the page showed *running* off
    a dispatch the page does not show, and the first byte of one it showed *waiting* off
    nothing when every dispatch was on the page."""
    director, store = make_director([make_pool(count=1)], [make_policy()])
    (ep,) = store.endpoints()
    a, b, c = [await director.route(LLMRequest(model="chat", prompt_text=t)) for t in "abc"]
    director.dispatch(a, ep)
    director.dispatch(b, ep)
    # The page shows one of them (both running): b, the newer, is the one it missed.
    ep.took_snapshot(EndpointMetrics(running=1.0, scraped_at=time.monotonic()))
    assert ep.waiting_estimate() == 1 and list(ep.unseen) == [b.dispatch_numbers[ep.name]]
    director.answering(a, ep, first_byte=True)
    assert ep.waiting_estimate() == 1  # b still waits
    director.dispatch(c, ep)
    assert ep.waiting_estimate() == 2
    director.answering(b, ep, first_byte=True)
    assert ep.waiting_estimate() == 1  # c
    director.end_attempt(c, ep)  # failed before answering
    assert ep.waiting_estimate() == 0
    # A page showing two waiting: each first byte takes one off, though none is unseen.
    ep.took_snapshot(EndpointMetrics(running=1.0, waiting=2.0, scraped_at=time.monotonic()))
    assert ep.waiting_estimate() == 2
    director.answering(a, ep, first_byte=False)  # a byte after the first: nothing changes
    director.end_attempt(a, ep)  # a ended: it answered already
    assert ep.waiting_estimate() == 2
    director.end_attempt(b, ep)  # likewise
    assert ep.waiting_estimate() == 2
    ep.answered(ep.dispatched())  # as a dispatch and its first byte before the next page
    assert ep.waiting_estimate() == 2
    d = await director.route(LLMRequest(model="chat", prompt_text="d"))
    director.dispatch(d, ep)
    ep.took_snapshot(EndpointMetrics(waiting=2.0, scraped_at=time.monotonic()))
    director.answering(d, ep, first_byte=True)
    assert ep.waiting_estimate() == 1 and ep.unseen == {}


def test_an_engine_never_scraped_keeps_a_bounded_count_of_unseen_dispatches() -> None:
    """Another replica's dispatches leave ``unseen`` only at a page; an engine whose scrapes
    keep failing would keep every one without the bound (memory grows with the outage)."""
    ep = Endpoint(name="e", address="a:1", pool="p")
    for _ in range(MAX_UNSEEN + 5):
        ep.dispatched()
    assert ep.dispatched_since_scrape == MAX_UNSEEN
    assert next(iter(ep.unseen)) == 6  # the oldest went first
    ep.answered(MAX_UNSEEN + 5)
    assert ep.dispatched_since_scrape == MAX_UNSEEN - 1


async def test_unhealthy_endpoints_are_filtered_and_none_left_is_503() -> None:
    director, store = make_director([make_pool(count=2)], [make_policy()])
    eps = store.endpoints()
    eps[0].scrape_failures = 3
    decision = await director.route(LLMRequest(model="chat", prompt_text="a"))
    assert decision.endpoints == [eps[1]]
    director.mark_unavailable(eps[1], for_s=60)
    # The other one failed only its scrapes: the panic rule routes to it rather than refuse.
    decision = await director.route(LLMRequest(model="chat", prompt_text="a"))
    assert decision.endpoints == [eps[0]]
    director.mark_unavailable(eps[0], for_s=60)
    with pytest.raises(RoutingError) as err:
        await director.route(LLMRequest(model="chat", prompt_text="a"))
    assert err.value.status == 503


async def test_admission_hook_can_shed_narrow_pools_and_hear_the_outcome() -> None:
    pools = [make_pool("a", base_port=8100), make_pool("b", base_port=8200)]
    policy = make_policy(pools=[{"name": "a"}, {"name": "b"}])
    director, _ = make_director(pools, [policy])
    finished: list[int] = []

    class OnlyB:
        async def admit(self, request: LLMRequest, resolution: Resolution) -> Admission:
            if request.tenant == "greedy":
                raise RoutingError(429, "budget_exhausted", "over budget", retry_after=3)
            return Admission(pools=["b"],
                             on_finish=lambda d, o: finished.append(o.status))

    director.add_admission_hook(OnlyB())
    for _ in range(10):
        d = await director.route(LLMRequest(model="chat", prompt_text="x"))
        assert d.pool.name == "b"
    director.finish(d, d.endpoints[0], Outcome(status=200))
    assert finished == [200]
    with pytest.raises(RoutingError) as err:
        await director.route(LLMRequest(model="chat", headers={"x-kvroute-tenant": "greedy"}))
    assert err.value.status == 429 and err.value.retry_after == 3
    assert director.metrics.registry.get_sample_value(
        "kvroute_shed_requests_total", {"policy": "chat", "reason": "budget_exhausted"}) == 1.0


async def test_fallback_pool_used_only_when_primaries_have_no_endpoint() -> None:
    pools = [make_pool("a", base_port=8100), make_pool("b", base_port=8200)]
    policy = make_policy(pools=[{"name": "a"}, {"name": "b", "role": "fallback"}])
    director, store = make_director(pools, [policy])
    for _ in range(5):
        assert (await director.route(LLMRequest(model="chat"))).pool.name == "a"
    for ep in store.endpoints():
        if ep.pool == "default/a":
            ep.scrape_failures = 5
    assert (await director.route(LLMRequest(model="chat"))).pool.name == "b"


async def test_load_scorers_prefer_idle_and_treat_stale_as_average() -> None:
    policy = make_policy(scoring={"scorers": [{"type": "queue-depth"},
                                              {"type": "kv-utilization"}]})
    director, store = make_director([make_pool(count=3)], [policy])
    e0, e1, e2 = store.endpoints()
    set_metrics(e0, waiting=5, kv_cache_usage=0.9)
    set_metrics(e1, waiting=0, kv_cache_usage=0.1)
    set_metrics(e2, waiting=0, kv_cache_usage=0.0)
    e2.metrics = EndpointMetrics(waiting=0, kv_cache_usage=0.0,
                                      scraped_at=time.monotonic() - 60)  # stale
    decision: Decision = await director.route(LLMRequest(model="chat"))
    assert decision.endpoints[0] is e1
    stale = next(s for s in decision.ranked if s.endpoint is e2)
    assert stale.by_scorer["kv-utilization"] == pytest.approx(0.5)


async def test_policy_saturation_threshold_reaches_the_load_headroom_filter() -> None:
    director, store = make_director([make_pool()], [make_policy(
        admission={"saturationQueueDepth": 3})])
    decision = await director.route(LLMRequest(model="chat", prompt_text="hi"))
    resolution = store.resolve("chat", {})
    assert resolution is not None
    profile = director.profile_for(resolution, decision.pool)
    filters = [f for f in profile.filters if isinstance(f, LoadHeadroomFilter)]
    assert filters and filters[0].max_waiting == 3


async def test_policy_lora_adapter_reaches_the_scorer_and_the_forwarded_model() -> None:
    """PoolTarget.loraAdapter: the lora-affinity scorer sees the adapter (it prefers the engine
    that has it loaded) and the engine is asked for the adapter, not the base model."""
    from kvroute_router.openai.upstream import upstream_changes

    pool = make_pool("local", model="base", count=2)
    policy = make_policy("sql", model="sql", pools=[{"name": "local", "loraAdapter": "sql-lora"}],
                         scoring={"scorers": [{"type": "lora-affinity"}]})
    director, store = make_director([pool], [policy])
    local = store.pool("default/local")
    assert local is not None
    endpoints = list(local.endpoints.values())
    set_metrics(endpoints[0], running_loras=frozenset(), max_loras=1,
                waiting_loras=frozenset({"other"}))
    set_metrics(endpoints[1], running_loras=frozenset({"sql-lora"}), max_loras=1)
    for _ in range(5):
        decision = await director.route(LLMRequest(model="sql", prompt_text="q"))
        assert decision.request.lora_adapter == "sql-lora"
        assert decision.endpoints[0] is endpoints[1]
        changes = upstream_changes({"model": "sql"}, "completions", decision.served_model,
                                   decision.request.max_tokens)
        assert changes["model"] == "sql-lora"


async def test_priority_engines_get_the_routers_priority_and_cached_prompts_go_first() -> None:
    """spec.engine.schedulingPolicy: Priority — the forwarded body's vLLM ``priority`` is the
    router's (arrival ms plus prefillPriorityMsPerToken per prompt token the endpoint does not
    hold), whatever the client sent; a prompt the endpoint holds is penalised less than the
    same prompt's first (uncached) visit. FCFS engines keep the client's field."""
    from kvroute_router.openai.upstream import upstream_changes

    pool = make_pool("local", count=1)
    policy = make_policy("chat", scoring={"scorers": [{"type": "prefix-approx"}],
                                          "prefillPriorityMsPerToken": 0.5})
    director, _ = make_director([pool], [policy])
    prompt = "a long shared context " * 200
    first = await director.route(LLMRequest(model="chat", prompt_text=prompt))
    endpoint = first.endpoints[0]
    assert first.engine_priority(endpoint) is None  # FCFS engines: the client's field
    assert upstream_changes({"model": "test-model", "priority": -9}, "completions",
                            first.served_model, None,
                            priority=first.engine_priority(endpoint)) == {}

    pool.spec.engine.scheduling_policy = "Priority"
    miss = await director.route(LLMRequest(model="chat", prompt_text=prompt))
    miss_priority = miss.engine_priority(endpoint)
    assert miss_priority is not None
    penalty = miss_priority - miss.request.received_unix_ms
    assert penalty == round(0.5 * miss.request.prompt_size_estimate()) > 0
    director.dispatch(miss, endpoint)  # the approximate scorer learns the prompt is there
    hit = await director.route(LLMRequest(model="chat", prompt_text=prompt + "one question"))
    hit_priority = hit.engine_priority(endpoint)
    assert hit_priority is not None
    assert 0 <= hit_priority - hit.request.received_unix_ms < penalty / 4
    # A hostile client's own priority never reaches a priority engine.
    changes = upstream_changes({"model": "test-model", "priority": -(2**62)}, "completions",
                               hit.served_model, None, priority=hit_priority)
    assert changes["priority"] == hit_priority
    assert upstream_changes({"model": "test-model"}, "chat", hit.served_model, None,
                            priority=hit_priority) == {"priority": hit_priority}

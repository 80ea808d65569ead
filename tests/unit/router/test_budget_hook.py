"""The budget admission hook on the director's request path: 429 naming the budget, downgrade
to the cheap pool, settle with real usage, concurrency slots freed on every path, live policy
edits, API-key tenants, and the proxy's tenant-header and body handling."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import RoutePolicy
from kvroute_router.admission.hook import BudgetHook, prompt_tokens_upper_bound
from kvroute_router.app import Router, RouterSettings
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Decision, Director, Outcome, RoutingError
from kvroute_router.framework.request import LLMRequest
from kvroute_router.openai.requests import parse_request
from kvroute_router.openai.upstream import upstream_changes
from kvroute_router.openai.usage import streamed_events, usage_of
from kvroute_router.proxy.server import OpenAIProxy
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool

CHAT = {"policy_namespace": "default", "policy": "chat"}  # a policy's metric labels

# 1000 USD per million tokens = 0.001 USD a token (strong); 10 USD per million (weak).
STRONG: dict[str, Any] = {
    "cost": {"perMillionInputTokensUSD": 1000, "perMillionOutputTokensUSD": 1000},
    "quality": {"tier": "strong"}}
WEAK: dict[str, Any] = {"cost": {"perMillionInputTokensUSD": 10, "perMillionOutputTokensUSD": 10},
        "quality": {"tier": "weak"}}
PROMPT = "x" * 100  # 100 UTF-8 bytes: the prompt's upper bound is 100 tokens


def _pools() -> list[InferencePool]:
    return [make_pool("strong", base_port=8100, **STRONG),
            make_pool("weak", base_port=8200, **WEAK)]


def _setup(policy: RoutePolicy, pools: list[InferencePool] | None = None
           ) -> tuple[Director, Datastore, BudgetHook, CollectorRegistry]:
    director, store = make_director(pools or _pools(), [policy])
    registry = CollectorRegistry()
    hook = BudgetHook(store, metrics=BudgetMetrics(registry))
    director.add_admission_hook(hook)
    return director, store, hook, registry


async def _settled(hook: BudgetHook) -> None:
    # Settles run as tasks; a generous bound that only a hang exceeds.
    assert await hook.settled(30.0), "budget settles did not finish"


async def _serve(director: Director, hook: BudgetHook, request: LLMRequest,
                 completion_tokens: int = 10) -> Decision:
    decision = await director.route(request)
    endpoint = decision.endpoints[0]
    director.dispatch(decision, endpoint)
    director.end_attempt(decision, endpoint)
    director.finish(decision, endpoint, Outcome(status=200, prompt_tokens=100,
                                                completion_tokens=completion_tokens))
    await _settled(hook)
    return decision


def _request(**kw: Any) -> LLMRequest:
    return LLMRequest(model="chat", prompt_text=PROMPT, max_tokens=10, **kw)


async def test_usd_budget_refuses_with_429_naming_the_budget_and_settles_real_usage() -> None:
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "team", "usd": 0.3, "window": "1m"}])
    director, _, hook, registry = _setup(policy)
    for _ in range(2):  # 110 tokens x 0.001 = 0.11 USD each
        assert (await _serve(director, hook, _request())).pool.name == "strong"
    with pytest.raises(RoutingError) as refused:
        await director.route(_request())
    err = refused.value
    assert err.status == 429 and err.code == "budget_exhausted"
    assert "budget 'team' (usd)" in err.message and "'anonymous'" in err.message
    assert err.param == "budgets[team].usd"
    assert err.retry_after is not None and 0 < err.retry_after <= 60
    labels = {**CHAT, "budget": "team", "tenant": "anonymous"}
    assert registry.get_sample_value("kvroute_budget_spend_usd_total",
                                      labels) == pytest.approx(0.22)
    assert registry.get_sample_value("kvroute_budget_tokens_total",
                                      {**labels, "kind": "output"}) == 20
    assert registry.get_sample_value("kvroute_budget_requests_total",
                                      {**labels, "outcome": "rejected"}) == 1
    assert director.metrics.registry.get_sample_value(
        "kvroute_shed_requests_total", {"policy": "chat", "reason": "budget_exhausted"}) == 1


async def test_downgrade_routes_to_the_cheap_pool_when_the_strong_one_is_unaffordable() -> None:
    policy = make_policy(pools=[{"name": "strong"}, {"name": "weak"}], budgets=[
        {"name": "team", "usd": 0.25, "window": "1m", "onExhausted": "Downgrade"}],
        batching={"enabled": False})
    director, _, hook, registry = _setup(policy)
    served = [(await _serve(director, hook, _request())).pool.name for _ in range(6)]
    assert "weak" in served and served[-1] == "weak"
    spend = registry.get_sample_value("kvroute_budget_spend_usd_total",
                                      {**CHAT, "budget": "team",
                                       "tenant": "anonymous"})
    assert spend is not None and spend <= 0.25 + 1e-9


async def test_concurrency_slot_is_freed_by_finish_and_by_a_request_that_got_no_endpoint(
        ) -> None:
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "lanes", "maxConcurrency": 2}])
    director, store, hook, _ = _setup(policy)
    held = [await director.route(_request()) for _ in range(2)]
    with pytest.raises(RoutingError) as refused:
        await director.route(_request())
    assert refused.value.status == 429 and "maxConcurrency" in refused.value.message
    director.finish(held[0], held[0].endpoints[0], Outcome(status=200, prompt_tokens=1,
                                                           completion_tokens=1))
    await _settled(hook)
    held[0] = await director.route(_request())
    # A request admitted by the hook but refused later (every endpoint refused connections:
    # 503) frees its slot.
    director.finish(held[0], held[0].endpoints[0], Outcome(status=200))
    await _settled(hook)
    for ep in store.endpoints():
        director.mark_unavailable(ep, for_s=60)
    with pytest.raises(RoutingError) as unavailable:
        await director.route(_request())
    assert unavailable.value.status == 503
    await _settled(hook)
    for ep in store.endpoints():
        ep.unavailable_until = 0.0
    await director.route(_request())  # 1 held + this one = 2: fits


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_concurrency_slots_expire_after_the_policys_request_timeout_from_start_up(
        ) -> None:
    # A slot whose settle never comes (a crash between admission and finish) is held for the
    # policy's requestTimeoutSeconds plus a margin, also for policies loaded at start-up (they
    # kept the ledger's 600 s default).
    from kvroute_router.budget.ledger import BudgetLedger

    policy = make_policy(pools=[{"name": "strong"}], requestTimeoutSeconds=20, budgets=[
        {"name": "lanes", "maxConcurrency": 1}])
    director, store = make_director(_pools(), [policy])
    clock = _Clock()
    hook = BudgetHook(store, ledger=BudgetLedger(clock=clock))
    director.add_admission_hook(hook)
    await director.route(_request())  # never finished
    with pytest.raises(RoutingError):
        await director.route(_request())
    clock.now += 20 + 30 + 1  # past the timeout and ledger.DEADLINE_MARGIN_S (30 s)
    await director.route(_request())


async def test_policy_edits_apply_to_the_next_request() -> None:
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "team", "requestsPerMinute": 1}])
    director, store, hook, _ = _setup(policy)
    await _serve(director, hook, _request())
    with pytest.raises(RoutingError) as refused:
        await director.route(_request())
    assert (refused.value.status, refused.value.code) == (429, "budget_exhausted")
    store.replace(_pools(), [make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "team", "requestsPerMinute": 3}])])
    await _serve(director, hook, _request())
    store.replace(_pools(), [make_policy(pools=[{"name": "strong"}])])  # budgets removed
    for _ in range(3):
        await _serve(director, hook, _request())


async def test_tenants_are_separate_and_api_keys_map_to_tenants() -> None:
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "each", "tenant": "*", "requestsPerMinute": 1}],
        tenancy={"source": "APIKey", "apiKeysSecretRef": {"name": "keys"}})
    director, store = make_director(_pools(), [policy])
    hook = BudgetHook(store, metrics=BudgetMetrics(CollectorRegistry()),
                      api_keys=lambda p: {"alice": "key-a", "bob": "key-b"})
    director.add_admission_hook(hook)

    def keyed(key: str) -> LLMRequest:
        return _request(headers={"authorization": f"Bearer {key}",
                                 "x-kvroute-tenant": "bob"})

    assert (await _serve(director, hook, keyed("key-a"))).request.tenant == "alice"
    with pytest.raises(RoutingError) as refused:
        await director.route(keyed("key-a"))  # the header does not switch the tenant
    assert (refused.value.status, refused.value.code) == (429, "budget_exhausted")
    assert (await _serve(director, hook, keyed("key-b"))).request.tenant == "bob"
    assert (await _serve(director, hook, keyed("nope"))).request.tenant == "anonymous"


async def test_admission_sheds_sheddable_traffic_under_saturation() -> None:
    policy = make_policy(pools=[{"name": "strong"}], admission={
        "saturationQueueDepth": 1, "priorityClasses": [
            {"name": "batch", "priority": -1, "sheddable": True}]})
    director, store, _, registry = _setup(policy)
    for ep in store.endpoints():
        ep.unseen = dict.fromkeys(range(3))  # waiting estimate 3 >= 1 on every endpoint
    with pytest.raises(RoutingError) as shed:
        await director.route(_request(headers={"x-kvroute-priority": "batch"}))
    assert shed.value.status == 429 and shed.value.code == "overloaded"
    assert registry.get_sample_value("kvroute_admission_shed_total",
                                      {**CHAT, "priority": "batch"}) == 1


async def test_admission_still_sheds_when_every_scrape_fails() -> None:
    """A metrics outage (every scrape timing out) routes under the healthy filter's panic rule;
    admission judges saturation over the same endpoints, from the router's own in-flight counts,
    instead of seeing none and admitting everything."""
    policy = make_policy(pools=[{"name": "strong"}], admission={
        "saturationQueueDepth": 1, "priorityClasses": [
            {"name": "batch", "priority": -1, "sheddable": True}]})
    director, store, _, _ = _setup(policy)
    for ep in store.endpoints():
        ep.scrape_failures = 3  # the healthy filter's limit: not healthy, still reachable
        ep.unseen = dict.fromkeys(range(3))
    with pytest.raises(RoutingError) as shed:
        await director.route(_request(headers={"x-kvroute-priority": "batch"}))
    assert shed.value.status == 429 and shed.value.code == "overloaded"
    for ep in store.endpoints():
        ep.unseen.clear()  # room again: routed under the panic rule
    decision = await director.route(_request(headers={"x-kvroute-priority": "batch"}))
    assert decision.ranked


async def test_a_finished_request_releases_queued_ones_without_any_budget() -> None:
    """The router's hook hears every completion: a queued request goes on when another ends,
    not only at the next metrics refresh (before, only budgeted requests released one)."""
    settings = RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                              metrics_port=None)
    router = Router(settings)
    hook = router.budget_hook
    assert hook is not None and hook in router.director.completion_observers
    policy = make_policy(pools=[{"name": "strong"}], admission={
        "saturationQueueDepth": 1, "queueTimeoutMs": 60_000})
    router.datastore.replace(_pools(), [policy])
    busy = router.datastore.endpoints()
    for ep in busy:
        ep.unseen = dict.fromkeys(range(1))  # waiting estimate 1 >= 1: every endpoint saturated
    queued = asyncio.create_task(router.director.route(_request()))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not queued.done()
    running = busy[0]
    running.unseen.clear()  # its request ended: the director's end_attempt ...
    decision = Decision(request=_request(), policy=policy, policy_key="default/chat",
                        pool=router.datastore.pool("default/strong"),  # type: ignore[arg-type]
                        profile=None, state=None, ranked=[],  # type: ignore[arg-type]
                        decided_in_s=0.0)
    hook.on_complete(decision, Outcome(status=200))  # ... then the completion
    routed = await asyncio.wait_for(queued, 5)
    assert routed.endpoints[0] is running


async def test_a_request_let_go_newest_first_goes_newest_first_at_the_engine_too() -> None:
    """spec.admission.newestFirstAfterMs: a request the late queue let go newest-first is
    marked so, and a priority engine gets it ahead of every request ranked by arrival (its
    arrival negated); one that never queued is ranked by arrival."""
    settings = RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                              metrics_port=None)
    router = Router(settings)
    hook = router.budget_hook
    assert hook is not None
    policy = make_policy(pools=[{"name": "strong"}], admission={
        "saturationQueueDepth": 1, "queueTimeoutMs": 60_000, "newestFirstAfterMs": 0})
    router.datastore.replace(_pools(), [policy])
    pool = router.datastore.pool("default/strong")
    assert pool is not None
    pool.pool.spec.engine.scheduling_policy = "Priority"
    first = await router.director.route(_request())
    assert not first.request.newest_first
    first_priority = first.engine_priority(first.endpoints[0])
    assert first_priority is not None and first_priority > 0
    busy = router.datastore.endpoints()
    for ep in busy:
        ep.unseen = dict.fromkeys(range(1))  # every endpoint saturated
    queued = asyncio.create_task(router.director.route(_request()))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not queued.done()
    busy[0].unseen.clear()
    hook.on_complete(first, Outcome(status=200))
    routed = await asyncio.wait_for(queued, 5)
    assert routed.request.newest_first
    priority = routed.engine_priority(routed.endpoints[0])
    assert priority is not None and priority < 0 < first_priority


async def test_requests_without_budgets_are_left_alone() -> None:
    director, _, _, _ = _setup(make_policy(pools=[{"name": "strong"}, {"name": "weak"}]))
    request = LLMRequest(model="chat", prompt_text=PROMPT)
    decision = await director.route(request)
    assert decision.admissions == [] and request.max_tokens is None


async def test_a_request_without_max_tokens_is_bounded_for_the_estimate() -> None:
    policy = make_policy(pools=[{"name": "strong"}], budgets=[{"name": "t", "usd": 10}],
                         admission={"maxOutputTokens": 64})
    director, _, _, _ = _setup(policy)
    request = LLMRequest(model="chat", prompt_text=PROMPT)
    decision = await director.route(request)
    assert request.max_tokens == 64
    served, bound = decision.pool.model_name, request.max_tokens
    assert upstream_changes({"model": "chat"}, "chat", served, bound) == {"model": "test-model",
                                                             "max_tokens": 64}
    assert upstream_changes({"model": "test-model", "max_completion_tokens": 5}, "chat", served,
                            bound) == {}
    assert prompt_tokens_upper_bound(LLMRequest(model="m", prompt_text="é")) == 2
    assert prompt_tokens_upper_bound(LLMRequest(model="m", token_ids=[1, 2, 3])) == 3


def test_stream_events_are_counted_once_across_chunk_boundaries() -> None:
    stream = b"".join(b'data: {"n": %d}\n\n' % i for i in range(5)) + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        first, second = stream[:cut], stream[cut:]
        assert streamed_events(b"", first) + streamed_events(first, second) == 5
    assert usage_of(b'"usage": {"prompt_tokens": 7, "completion_tokens": 3}}') == (7, 3)


def test_proxy_drops_client_tenant_headers_unless_trusted() -> None:
    policy = make_policy(pools=[{"name": "strong"}], tenancy={"header": "x-team"})
    director, store = make_director(_pools(), [policy])
    sent = {"x-team": "a", "x-kvroute-tenant": "b", "x-kvroute-priority": "c",
            "content-type": "application/json"}
    trust = OpenAIProxy(director, store).trust
    assert trust.for_routing(sent, trust.peer_trusted("10.0.0.1")) == {
        "content-type": "application/json"}
    assert not trust.forwardable("x-team", False) and trust.forwardable("content-type", False)
    trust = OpenAIProxy(director, store, trust_tenant_header=True).trust
    assert trust.for_routing(sent, trust.peer_trusted("10.0.0.1")) == sent
    trust = OpenAIProxy(director, store, trusted_proxy_cidrs=["10.0.0.0/8"]).trust
    assert trust.peer_trusted("10.0.0.1") and not trust.peer_trusted("192.168.0.1")


def test_router_serves_budget_metrics_in_its_registry_and_routers_coexist() -> None:
    settings = RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                              metrics_port=None)
    first, second = Router(settings), Router(settings)
    for router in (first, second):
        text = generate_latest(router.metrics.registry).decode()
        assert "kvroute_budget_spend_usd_total" in text
        assert "kvroute_budget_tokens_total" in text
        assert "kvroute_requests_total" in text
        assert router.budget_hook is not None
        assert router.budget_hook in router.director.admission_hooks


async def test_same_named_policies_in_two_namespaces_share_no_budget_state() -> None:
    """Two RoutePolicies named ``chat`` (team-a, team-b), each routing its own model: spending
    one's budget leaves the other's untouched, and each has its own metric series."""
    pools = []
    for ns, port in (("team-a", 8100), ("team-b", 8300)):
        pool = make_pool("strong", model="m", base_port=port, **STRONG)
        pool.metadata.namespace = ns
        pools.append(pool)
    policies = []
    for ns, model in (("team-a", "model-a"), ("team-b", "model-b")):
        policy = make_policy(model=model, pools=[{"name": "strong"}], budgets=[
            {"name": "team", "usd": 0.3, "window": "1m"}])
        policy.metadata.namespace = ns
        policies.append(policy)
    director, store = make_director(pools, policies)
    registry = CollectorRegistry()
    hook = BudgetHook(store, metrics=BudgetMetrics(registry))
    director.add_admission_hook(hook)

    def request(model: str) -> LLMRequest:
        return LLMRequest(model=model, prompt_text=PROMPT, max_tokens=10)

    for _ in range(2):  # 0.11 USD each: team-a's budget is spent
        await _serve(director, hook, request("model-a"))
    with pytest.raises(RoutingError) as err:
        await director.route(request("model-a"))
    assert err.value.status == 429
    for _ in range(2):  # team-b's budget of the same name is untouched
        await _serve(director, hook, request("model-b"))
    assert hook.ledger.meter_key("team-a/chat", "team", "anonymous", "usd") != \
        hook.ledger.meter_key("team-b/chat", "team", "anonymous", "usd")

    def spend(ns: str) -> float | None:
        return registry.get_sample_value("kvroute_budget_spend_usd_total", {
            "policy_namespace": ns, "policy": "chat", "budget": "team", "tenant": "anonymous"})

    assert spend("team-a") == pytest.approx(0.22) and spend("team-b") == pytest.approx(0.22)
    assert registry.get_sample_value("kvroute_budget_requests_total", {
        "policy_namespace": "team-a", "policy": "chat", "budget": "team", "tenant": "anonymous",
        "outcome": "rejected"}) == 1
    assert registry.get_sample_value("kvroute_budget_requests_total", {
        "policy_namespace": "team-b", "policy": "chat", "budget": "team", "tenant": "anonymous",
        "outcome": "rejected"}) is None
    # Deleting team-a's policy forgets only its budgets.
    store.delete_policy("team-a/chat")
    hook.sync()
    assert not hook.ledger.budgets_for("team-a/chat", "anonymous")
    assert hook.ledger.budgets_for("team-b/chat", "anonymous")


async def test_api_keys_from_the_datastore_are_hashed_and_followed_live() -> None:
    """Kubernetes mode: the Secret's keys reach the hook as SHA-256 digests in the datastore;
    a changed Secret applies to the next request; no plaintext key is kept by the resolver."""
    from kvroute_router.datastore.api_keys import digests_of

    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "each", "tenant": "*", "requestsPerMinute": 100}],
        tenancy={"source": "APIKey", "apiKeysSecretRef": {"name": "keys"}})
    director, store, hook, _ = _setup(policy)

    def keyed(key: str) -> LLMRequest:
        return _request(headers={"authorization": f"Bearer {key}"})

    assert (await _serve(director, hook, keyed("key-a"))).request.tenant == "anonymous"
    store.set_api_keys("default/keys", digests_of({"alice": "key-a", "bob": "key-b\nkey-b2"}))
    assert (await _serve(director, hook, keyed("key-a"))).request.tenant == "alice"
    assert (await _serve(director, hook, keyed("key-b2"))).request.tenant == "bob"
    policy_now = hook._policies["default/chat"].policy
    assert "key-a" not in repr(vars(hook.tenants.resolver(policy_now)))  # digests only
    store.set_api_keys("default/keys", digests_of({"carol": "key-a"}))  # rotated
    assert (await _serve(director, hook, keyed("key-a"))).request.tenant == "carol"
    assert (await _serve(director, hook, keyed("key-b"))).request.tenant == "anonymous"
    store.delete_api_keys("default/keys")
    assert (await _serve(director, hook, keyed("key-a"))).request.tenant == "anonymous"


async def test_a_downgrade_budget_may_send_requests_to_a_fallback_pool() -> None:
    """The ledger's downgrade step (not the batch stage): one primary pool (strong) and a
    cheaper fallback; once the USD budget cannot pay for strong, requests go to the fallback."""
    policy = make_policy(pools=[{"name": "strong"}, {"name": "weak", "role": "fallback"}],
                         budgets=[{"name": "team", "usd": 0.25, "window": "1m",
                                   "onExhausted": "Downgrade"}])
    director, _, hook, registry = _setup(policy)
    served = [(await _serve(director, hook, _request())).pool.name for _ in range(4)]
    assert served == ["strong", "strong", "weak", "weak"]
    labels = {**CHAT, "budget": "team", "tenant": "anonymous"}
    assert registry.get_sample_value("kvroute_budget_requests_total",
                                     {**labels, "outcome": "downgraded"}) == 2
    assert registry.get_sample_value("kvroute_budget_in_flight", labels) == 0


async def test_shed_requests_are_counted_under_the_tenants_budgets() -> None:
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "team", "requestsPerMinute": 100}], admission={
        "saturationQueueDepth": 1, "priorityClasses": [
            {"name": "batch", "priority": -1, "sheddable": True}]})
    director, store, _, registry = _setup(policy)
    for ep in store.endpoints():
        ep.unseen = dict.fromkeys(range(3))  # saturated
    with pytest.raises(RoutingError) as shed:
        await director.route(_request(headers={"x-kvroute-priority": "batch"}))
    assert (shed.value.status, shed.value.code) == (429, "overloaded")
    labels = {**CHAT, "budget": "team", "tenant": "anonymous"}
    assert registry.get_sample_value("kvroute_budget_requests_total",
                                     {**labels, "outcome": "shed"}) == 1
    assert registry.get_sample_value("kvroute_budget_requests_total",
                                     {**labels, "outcome": "admitted"}) is None


def _parsed(body: dict[str, Any], kind: str = "chat") -> LLMRequest:
    return LLMRequest.from_openai(
        parse_request({"model": "chat", **body}, "chat" if kind == "chat" else "completions"),
        {})


async def _admitted(director: Director, request: LLMRequest) -> bool:
    try:
        await director.route(request)
    except RoutingError as exc:
        assert exc.status == 429 and exc.code == "budget_exhausted", exc.message
        return False
    return True


async def test_reservations_cover_n_best_of_every_prompt_tools_and_images() -> None:
    """Issue 14.5: a reservation is the request's real upper bound. With 10,000 tokens a
    minute, each request below fits alone and reserves more than half, so a second one held
    at the same time is refused (today each reserved ~the first prompt and one output)."""
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "t", "tokensPerMinute": 10_000}])
    chat = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 280,
                                                "parameters": {"type": "object"}}}
             for i in range(20)]  # ~6.5 kB of schema
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    heavy = [
        _parsed({"messages": chat, "max_tokens": 100, "n": 64}),
        _parsed({"prompt": "x", "max_tokens": 100, "best_of": 60, "n": 2}, "completions"),
        _parsed({"prompt": ["x", "y" * 6000], "max_tokens": 1}, "completions"),
        _parsed({"messages": chat, "max_tokens": 1, "tools": tools}),
        _parsed({"messages": [{"role": "user", "content": [image, image]}], "max_tokens": 1,
                 "functions": []}),
    ]
    for request in heavy:
        director, _, _, _ = _setup(policy)
        assert await _admitted(director, request)
        assert not await _admitted(director, request), request
    light = _parsed({"messages": chat, "max_tokens": 100})
    director, _, _, _ = _setup(policy)
    assert all([await _admitted(director, light) for _ in range(5)])


async def test_a_200_kb_tools_schema_reserves_its_size() -> None:
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 1000,
                                                "parameters": {"type": "object"}}}
             for i in range(200)]
    request = _parsed({"messages": [{"role": "user", "content": "hi"}], "tools": tools})
    assert prompt_tokens_upper_bound(request) >= 200_000
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "t", "tokensPerMinute": 100_000}])
    director, _, _, _ = _setup(policy)
    assert not await _admitted(director, request)


async def test_tenants_leave_the_gauge_refresh_once_their_usd_windows_are_empty() -> None:
    """The hook refreshed the USD gauges of every (policy, tenant) ever seen, forever: a set and
    a loop of one entry per tenant. A tenant without a USD budget, or whose USD windows are
    empty (gauges then read 0), now leaves it until its next request."""
    from kvroute_router.budget.ledger import BudgetLedger

    now = [1000.0]
    policy = make_policy(pools=[{"name": "strong"}], budgets=[
        {"name": "team", "tenant": "*", "usd": 100, "window": "1m"},
        {"name": "tokens", "tenant": "*", "tokensPerMinute": 10**6}])
    director, store = make_director(_pools(), [policy])
    registry = CollectorRegistry()
    metrics = BudgetMetrics(registry)
    hook = BudgetHook(store, metrics=metrics,
                      ledger=BudgetLedger(metrics=metrics, clock=lambda: now[0]))
    director.add_admission_hook(hook)
    for tenant in ("a", "b"):
        await _serve(director, hook, _request(headers={"x-kvroute-tenant": tenant}))
    assert hook.sizes()["budget_tracked_tenants"] == 2
    await hook.refresh_gauges()  # spend in the window: kept
    assert hook.sizes()["budget_tracked_tenants"] == 2
    now[0] += 120  # the windows have passed
    await hook.refresh_gauges()
    assert hook.sizes()["budget_tracked_tenants"] == 0
    labels = {**CHAT, "budget": "team", "tenant": "a"}
    assert registry.get_sample_value("kvroute_budget_window_spend_usd", labels) == 0
    await _serve(director, hook, _request(headers={"x-kvroute-tenant": "a"}))
    assert hook.sizes()["budget_tracked_tenants"] == 1  # back with its next request

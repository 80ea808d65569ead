"""``prefill-cost``: one cost in prompt tokens (the endpoint's prefill backlog from this router
plus the part of the prompt it does not hold), and the backlog's bookkeeping in the request
lifecycle (added at dispatch, taken off at the first byte or the attempt's end, exactly once)."""

from __future__ import annotations

from kvroute_api.route_policy import ScoringSpec
from kvroute_router.director import Director
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.profile import STATE_PREFIX_HELD, build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.plugins.prefill_cost import PrefillCostScorer

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool

CONTEXT = "c" * 3840  # 15 approximate-prefix blocks of 256 characters
"""A tenant's shared context; a prompt of it plus a 256-character question is 4,096 characters
(16 blocks), which the router estimates at 1,024 tokens (4 bytes a token)."""


def _endpoints(*backlogs: float) -> list[Endpoint]:
    return [Endpoint(name=f"e{i}", address=f"127.0.0.1:{9000 + i}", pool="default/p",
                     prefill_backlog=backlog) for i, backlog in enumerate(backlogs)]


def _request(question: str = "q", prompt: str = CONTEXT) -> LLMRequest:
    return LLMRequest(model="chat", prompt_text=prompt + question.ljust(256, "."),
                      max_tokens=8)


def test_cost_is_backlog_plus_the_unheld_part_of_the_prompt() -> None:
    state = CycleState()
    state.write(STATE_PREFIX_HELD, {"e0": 0.75, "e1": 0.0})
    eps = _endpoints(100.0, 0.0, 1000.0)  # e2: absent from the match, nothing held
    scores = PrefillCostScorer(miss_weight=1.0).score(state, _request(), eps)
    # costs: 100 + 256 = 356, 0 + 1024, 1000 + 1024
    assert scores == [1.0, 357 / 1025, 357 / 2025]


def test_without_a_prefix_match_the_whole_prompt_counts_everywhere() -> None:
    scores = PrefillCostScorer(miss_weight=1.0).score(CycleState(), _request(),
                                                      _endpoints(0.0, 500.0))
    assert scores == [1.0, 1025 / 1525]
    assert PrefillCostScorer().score(CycleState(), _request(), []) == []


def _context(**scoring: object) -> PluginContext:
    return PluginContext(scoring=ScoringSpec.model_validate(scoring, by_alias=True),
                         pool_key="default/p", pool=None, services=SharedServices())


def test_a_prefix_scorer_at_weight_0_runs_only_for_a_scorer_that_reads_its_match() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    alone = build_profile(registry, _context(scorers=[
        {"type": "prefix-approx", "weight": 0}, {"type": "queue-depth"}]), "t")
    assert [s.type_name for s in alone.scorers] == ["queue-depth"]
    assert not alone.share_prefix_held
    # Listed after prefill-cost, it still runs first; columns keep the policy's order.
    shared = build_profile(registry, _context(scorers=[
        {"type": "prefill-cost"}, {"type": "prefix-approx", "weight": 0}]), "t")
    assert [s.type_name for s in shared.scorers] == ["prefill-cost", "prefix-approx"]
    assert shared.share_prefix_held
    state = CycleState()
    eps = _endpoints(0.0, 0.0)
    request = _request()
    ranked = shared.run(state, request, eps, 2)
    assert state.read(STATE_PREFIX_HELD, dict) == {"e0": 0.0, "e1": 0.0}
    assert list(ranked[0].by_scorer) == ["prefill-cost", "prefix-approx"]
    # The weight-0 scorer adds nothing to the total but keeps its bookkeeping: once the
    # request went to e1, e1 holds the context for the next one.
    assert ranked[0].total == ranked[0].by_scorer["prefill-cost"]
    shared.dispatched(state, request, eps[1])
    state = CycleState()
    shared.run(state, _request("another question"), eps, 2)
    assert state.read(STATE_PREFIX_HELD, dict) == {"e0": 0.0, "e1": 15 / 16}


def _director() -> Director:
    policy = make_policy(scoring={"scorers": [{"type": "prefix-approx", "weight": 0},
                                              {"type": "prefill-cost"}]})
    director, _ = make_director([make_pool(count=2)], [policy])
    return director


def _by_name(director: Director) -> dict[str, Endpoint]:
    return {ep.name: ep for ep in director.datastore.endpoints()}


async def test_the_backlog_is_added_at_dispatch_and_taken_off_once_at_the_first_byte() -> None:
    director = _director()
    eps = _by_name(director)
    eps["local-1"].prefill_backlog = 10.0  # a little work queued there: local-0 is chosen
    routed = await director.open(_request())
    assert routed.endpoint is eps["local-0"]
    assert eps["local-0"].prefill_backlog == 1024.0
    routed.answering()
    assert eps["local-0"].prefill_backlog == 0.0
    assert eps["local-0"].in_flight == 1  # still streaming: only the prefill is done
    routed.answering()
    routed.close()
    assert eps["local-0"].prefill_backlog == 0.0
    assert eps["local-1"].prefill_backlog == 10.0  # not ours to take off
    assert eps["local-0"].in_flight == 0


async def test_an_attempt_that_never_answered_leaves_no_backlog_and_a_retry_moves_it() -> None:
    director = _director()
    eps = _by_name(director)
    eps["local-1"].prefill_backlog = 10.0
    routed = await director.open(_request())
    assert eps["local-0"].prefill_backlog == 1024.0
    routed.dispatch(eps["local-1"])  # the first attempt failed before answering
    assert eps["local-0"].prefill_backlog == 0.0
    assert eps["local-1"].prefill_backlog == 1034.0
    async with routed:
        pass  # the request ends with no answer at all (finished by close)
    assert eps["local-1"].prefill_backlog == 10.0


async def test_the_holder_keeps_a_tenant_until_its_backlog_outweighs_recomputing() -> None:
    director = _director()
    eps = _by_name(director)
    eps["local-1"].prefill_backlog = 10.0
    first = await director.open(_request("first"))
    assert first.endpoint is eps["local-0"]  # the context is now held there (history)
    first.answering()
    # local-0 holds the context (15 of the prompt's 16 blocks): 64 tokens to compute there
    # against 1,024 on local-1, each weighted by prefillMissWeight (3): 192 against 10 + 3,072.
    second = await director.open(_request("second"))
    assert second.endpoint is eps["local-0"]
    assert eps["local-0"].prefill_backlog == 64.0  # the backlog counts real tokens, unweighted
    # 2,800 more tokens queued on local-0: 2,864 + 192 there against 3,082 on local-1 ...
    eps["local-0"].prefill_backlog += 2800.0
    stays = await director.open(_request("stays"))
    assert stays.endpoint is eps["local-0"]
    # ... and 64 more (the request above): now recomputing on local-1 is cheaper.
    third = await director.open(_request("third"))
    assert third.endpoint is eps["local-1"]
    assert eps["local-1"].prefill_backlog == 1034.0
    for routed in (first, second, stays, third):
        routed.close()
    assert {name: ep.prefill_backlog for name, ep in eps.items()} == {
        "local-0": 2800.0, "local-1": 10.0}


async def _holder_with_a_queue(scheduling_policy: str) -> tuple[Director, dict[str, Endpoint]]:
    """local-0 holds the tenant's context and has 5,000 arrival-ranked tokens queued."""
    policy = make_policy(scoring={"scorers": [{"type": "prefix-approx", "weight": 0},
                                              {"type": "prefill-cost"}]})
    pool = make_pool(count=2, engine={"blockSize": 32, "schedulingPolicy": scheduling_policy})
    director, _ = make_director([pool], [policy])
    eps = _by_name(director)
    eps["local-1"].prefill_backlog = 10.0
    first = await director.open(_request("first"))
    assert first.endpoint is eps["local-0"]
    first.close()
    eps["local-0"].add_prefill_backlog(5000.0)
    return director, eps


async def test_a_newest_first_request_waits_only_behind_newest_first_work_on_priority_engines(
        ) -> None:
    """Let go newest-first (``admission.newestFirstAfterMs``), a request overtakes every
    arrival-ranked request at a priority engine: the holder's queue of those does not send it
    to compute the context elsewhere. Its own tokens count in both backlogs until it answers."""
    director, eps = await _holder_with_a_queue("Priority")
    late = _request("late")
    late.newest_first = True
    newest = await director.open(late)
    assert newest.endpoint is eps["local-0"]  # 0 + 64 x 3 there, against 10 + 1,024 x 3
    assert (eps["local-0"].prefill_backlog, eps["local-0"].prefill_backlog_newest_first) == (
        5064.0, 64.0)
    # An arrival-ranked request waits behind all of it (5,064 + 192): it goes to local-1.
    ranked = await director.open(_request("ranked"))
    assert ranked.endpoint is eps["local-1"]
    assert eps["local-1"].prefill_backlog_newest_first == 0.0
    newest.answering()
    assert (eps["local-0"].prefill_backlog, eps["local-0"].prefill_backlog_newest_first) == (
        5000.0, 0.0)
    newest.close()
    ranked.close()
    # FCFS engines serve it in arrival order: the whole queue counts, and it leaves.
    director, eps = await _holder_with_a_queue("FCFS")
    late = _request("late")
    late.newest_first = True
    fcfs = await director.open(late)
    assert fcfs.endpoint is eps["local-1"]
    assert eps["local-1"].prefill_backlog_newest_first == 0.0
    fcfs.close()


def test_the_policy_sets_how_much_a_missing_token_weighs() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    eps = _endpoints(1500.0, 0.0)  # e0 holds 3/4 of the prompt but has 1,500 tokens queued
    picks = {}
    for weight in (1.0, 3.0):
        profile = build_profile(registry, _context(scorers=[{"type": "prefill-cost"}],
                                                   prefillMissWeight=weight), "t")
        state = CycleState()
        state.write(STATE_PREFIX_HELD, {"e0": 0.75, "e1": 0.0})
        picks[weight] = profile.scorers[0].scorer.score(state, _request(), eps)
    # weight 1: 1,500 + 256 against 1,024 -> e1; weight 3: 1,500 + 768 against 3,072 -> e0
    assert picks[1.0] == [1025 / 1757, 1.0]
    assert picks[3.0] == [1.0, 2269 / 3073]


def _busy_endpoints(*running: int) -> list[Endpoint]:
    """Idle prefill queues, ``running`` requests each (the router's own in-flight count:
    ``running_estimate`` without a scrape)."""
    eps = _endpoints(*([0.0] * len(running)))
    for ep, count in zip(eps, running, strict=True):
        ep.in_flight = count
    return eps


def test_the_default_sends_a_prompt_no_endpoint_holds_to_the_least_busy_of_the_cheapest() -> None:
    """The default scoring's running-requests (0.02) decides between endpoints prefill-cost
    finds equal; max-score alone would draw one at random (round 25 of emulated-fleet.md)."""
    registry = register_builtin_plugins(PluginRegistry())
    profile = build_profile(registry, _context(), "t")
    assert [(s.type_name, s.weight) for s in profile.scorers] == [
        ("prefix-approx", 0.0), ("prefill-cost", 1.0), ("running-requests", 0.02)]
    picked = set()
    for _ in range(30):
        eps = _busy_endpoints(5, 1, 3, 9)
        picked.add(profile.run(CycleState(), _request(), eps, 1)[0].endpoint.name)
    assert picked == {"e1"}


def test_the_running_requests_tie_break_never_outweighs_a_holder() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    profile = build_profile(registry, _context(), "t")
    eps = _busy_endpoints(0, 0)
    state = CycleState()
    profile.run(state, _request("first"), eps, 1)
    profile.dispatched(state, _request("first"), eps[0])  # e0 now holds the context
    eps[0].in_flight = 40  # the busiest endpoint there is, against an idle one
    eps[0].prefill_backlog = 2000.0  # and a backlog: 2,000 + 3 x 64 against 3 x 1,024
    state = CycleState()
    ranked = profile.run(state, _request("second"), eps, 2)
    assert state.read(STATE_PREFIX_HELD, dict) == {"e0": 15 / 16, "e1": 0.0}
    assert ranked[0].endpoint is eps[0]


def test_a_synced_replica_weighs_a_miss_by_the_replicas_weight() -> None:
    """prefillMissWeightReplicas (default 10) replaces prefillMissWeight (default 3) while
    replica sync counts more than one replica routing — counted per decision, so the weight
    follows the replicas that come and go; one router, or no replica sync, keeps 3."""
    from kvroute_router.datastore.store import Datastore
    from kvroute_router.replicasync.sync import ReplicaSync
    from kvroute_router.replicasync.wire import DispatchRecord, encode
    from prometheus_client import CollectorRegistry

    services = SharedServices()
    scorer = PrefillCostScorer.build(PluginContext(
        scoring=ScoringSpec(), pool_key="default/p", pool=None, services=services))
    assert (scorer.miss_weight, scorer.replicas_miss_weight) == (3.0, 10.0)
    state = CycleState()
    state.write(STATE_PREFIX_HELD, {"e0": 1.0})
    eps = _endpoints(2500.0, 0.0)  # e0 holds the 1,024-token prompt behind 2,500 queued
    assert scorer.weight() == 3.0  # no replica sync in this router
    assert scorer.score(state, _request(), eps) == [1.0, 2501 / 3073]  # e1: 3 x 1,024
    sync = ReplicaSync(None, Datastore(), services, CollectorRegistry())
    assert scorer.weight() == 3.0  # replica sync, no other replica heard from
    sync.receive(encode(b"B" * 16, [DispatchRecord("default/p", "e0", (7, 8), dispatch_id=1,
                                                   tokens=10)]))
    assert sync.replicas() == 2
    assert scorer.weight() == 10.0
    assert scorer.score(state, _request(), eps) == [1.0, 2501 / 10241]
    one_weight = PrefillCostScorer.build(PluginContext(
        scoring=ScoringSpec(prefill_miss_weight_replicas=3.0), pool_key="default/p",
        pool=None, services=services))
    assert one_weight.weight() == 3.0  # set to prefillMissWeight: one weight for any count

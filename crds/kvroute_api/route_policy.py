"""RoutePolicy: how traffic for one virtual model name is spread over pools (short name ``rp``),
with scoring weights, tenant budgets, batch-level routing, admission control, difficulty routing
and the response cache."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kvroute_api.meta import (
    CONDITION_REASON,
    DNS_SUBDOMAIN,
    ApiModel,
    Condition,
    LocalObjectReference,
    ResourceBase,
    Rule,
    SecretKeyReference,
)

HEADER_NAME = r"^[a-z0-9][-a-z0-9_]*$"

# The router's built-in scoring plugins; the router's registry is keyed by these names.
ScorerType = Literal[
    "prefix-precise", "prefix-approx", "queue-depth", "kv-utilization", "running-requests",
    "lora-affinity", "prefill-cost",
]
PickerType = Literal["max-score", "weighted-random"]


class HeaderMatch(ApiModel):
    """A request header that must have a given value."""

    name: str = Field(max_length=256, pattern=HEADER_NAME,
                      description="Header name, lower case.")
    value: str = Field(max_length=4096, description="Exact value the header must have.")


class MatchSpec(ApiModel):
    """Which requests the policy applies to."""

    model: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][-._/:A-Za-z0-9]*$",
                       description="The `model` name clients send; the policy owns this name.")
    headers: list[HeaderMatch] = Field(default_factory=list, max_length=16,
                                       description="Headers that must also match (all of them).")


class PoolTarget(ApiModel):
    """A pool that serves the policy's traffic."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="InferencePool name in the policy's namespace.")
    weight: int = Field(default=1, ge=0, le=1000,
                        description="Relative share of traffic when no budget or difficulty "
                                    "rule decides (0 = only as fallback).")
    role: Literal["primary", "fallback"] = Field(
        default="primary", description="primary pools take traffic; fallback pools only when "
                                       "every primary pool has no ready endpoint.")
    lora_adapter: str | None = Field(
        default=None, max_length=256, pattern=r"^[A-Za-z0-9][-._/:A-Za-z0-9]*$",
        description="LoRA adapter of the pool's engines that serves this policy's traffic (the "
                    "name vLLM serves it under, --lora-modules NAME=PATH): forwarded as the "
                    "request's model, and the lora-affinity scorer prefers engines that have "
                    "it loaded. Unset: the pool's base model.")


class ScorerWeight(ApiModel):
    """A scorer and its weight in the endpoint score."""

    type: ScorerType = Field(description="Built-in scorer: prefix-precise (KV-event index), "
                                         "prefix-approx (router's own history), queue-depth, "
                                         "kv-utilization, running-requests, lora-affinity, "
                                         "prefill-cost (fewest prompt tokens to compute before "
                                         "the first token: the endpoint's backlog from this "
                                         "router plus the part of this prompt it does not "
                                         "hold; reads the policy's prefix scorer, which then "
                                         "runs even at weight 0).")
    weight: float = Field(default=1.0, ge=0, le=100, description="Weight of this scorer.")


class ScoringSpec(ApiModel):
    """How an endpoint inside a pool is chosen: weighted scorers and a picker."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.scorers.all(a, self.scorers.exists_one(b, b.type == a.type))",
             message="each scorer type may appear only once",
             check=lambda s: len({x.type for x in s.scorers}) == len(s.scorers),
             field_path=".scorers", reason="FieldValueDuplicate"),
    )

    scorers: list[ScorerWeight] = Field(
        default_factory=lambda: [
            ScorerWeight(type="prefix-precise", weight=0.0),
            ScorerWeight(type="prefill-cost", weight=1.0),
            ScorerWeight(type="running-requests", weight=0.02),
        ],
        max_length=8,
        description="Scorers and weights; scores are in 0-1 and summed by weight. The default "
                    "prices cache and load in prompt tokens (prefill-cost), with prefix-precise "
                    "at weight 0 supplying the match it prices (a prefix scorer at weight 0 "
                    "runs only for prefill-cost), and running-requests at 0.02, which only "
                    "decides between endpoints prefill-cost finds (nearly) equal: a prompt no "
                    "endpoint holds goes to the one decoding the fewest requests instead of a "
                    "random one (docs/benchmarks/emulated-fleet.md, rounds 25-28: out of the "
                    "default in round 26 on an engine model vLLM does not match; back in round "
                    "28, level or ahead on every corrected run). The default "
                    "before round 5, [prefix-precise 3, queue-depth 1, kv-utilization 1], "
                    "measured lower goodput on the emulated fleet.")
    picker: PickerType = Field(default="max-score",
                               description="max-score (random tie-break) or weighted-random.")
    prefix_block_chars: int = Field(
        default=256, ge=16, le=65536,
        description="Block size in characters of the approximate prefix scorer.")
    prefill_miss_weight: float = Field(
        default=3.0, ge=0, le=100,
        description="prefill-cost only: how much a prompt token the endpoint does not hold "
                    "weighs against a token already queued there. 1 counts only this "
                    "request's wait; above 1 also what recomputing a context elsewhere costs "
                    "the fleet (the capacity, and the other tenant's context it evicts), so "
                    "tenants move off a busy holder later. 3 measured best on the emulated "
                    "fleet (docs/benchmarks/emulated-fleet.md, round 5).")
    prefill_miss_weight_replicas: float = Field(
        default=10.0, ge=0, le=100,
        description="prefill-cost only: the miss weight a router replica uses instead of "
                    "prefillMissWeight while replica sync counts more than one replica "
                    "routing (--replica-sync-redis-url; one router, or replicas without "
                    "sync, use prefillMissWeight). A replica weighs load it learns from the "
                    "others a moment late, so a spill it decides on is worth less. 10 against "
                    "3: TTFT p90 -30 % for three synced replicas at 120 req/s on 16 emulated "
                    "H100s (three seeds), +5 % at 90 req/s in the simulator "
                    "(docs/benchmarks/emulated-fleet.md, round 42). Set it to "
                    "prefillMissWeight for one weight whatever the replica count.")
    prefill_wait_ms: int = Field(
        default=0, ge=0, le=600000,
        description="prefix-precise only: how long a request may wait at the router while the "
                    "endpoint it was sent to is still computing the same prompt prefix for an "
                    "earlier request (dispatched by this router, not yet answering). The wait "
                    "ends when the earlier request starts answering or ends, or after this "
                    "long, whichever is first. 0 (the default since round 30): never wait — "
                    "vLLM shares the blocks an earlier request has scheduled, so on one engine "
                    "the wait saves no prefill and only delays (64 emulated engines: TTFT p90 "
                    "-10 % and -1 %, goodput +1 % and +4 % without the 200 ms it had; "
                    "docs/benchmarks/emulated-fleet.md, round 30). If set, keep it about the "
                    "time the engine takes to compute a long shared prefix (200 ms: ~6k tokens "
                    "on an H100); longer caps cost the waiting request its place in the "
                    "engine's queue (round 6). Behind Envoy, keep it below the ext_proc "
                    "messageTimeout (chart: 10 s).")
    prefill_priority_ms_per_token: float = Field(
        default=0.1, ge=0, le=1000,
        description="Pools whose engines run priority scheduling (InferencePool "
                    "spec.engine.schedulingPolicy: Priority) only: the router sets each "
                    "request's vLLM `priority` to its arrival time in milliseconds plus this "
                    "many milliseconds per prompt token the chosen engine does not hold (by the "
                    "decision's prefix match), so the engine serves a mostly cached prompt "
                    "before a full miss that arrived up to that much earlier, and never holds "
                    "a miss back longer than its own penalty (no starvation); a request is "
                    "never ranked ahead of the one still computing the prefix it reuses. 0: "
                    "arrival order. 0.1 (a 6k-token miss yields to prompts up to 600 ms "
                    "younger) measured best for TTFT p90 and p99 in the fleet simulator; larger "
                    "values cut p50 further and the tail less (docs/benchmarks/emulated-fleet.md, "
                    "round 17).")
    stale_metrics_ms: int = Field(
        default=3000, ge=100, le=600000,
        description="Metrics older than this are stale; load scorers treat the endpoint as "
                    "average rather than trusting old numbers. Keep it above the router's "
                    "scrape periods (--scrape-interval-ms, default 100, for engines also "
                    "serving requests this router did not send; "
                    "--accounted-scrape-interval-ms, default 1000; "
                    "--idle-scrape-interval-ms, default 2000), or snapshots go stale between "
                    "two scrapes: the router logs a warning naming the flag. (1000 before "
                    "2026-12, when every engine was scraped every 100 ms.)")


class TenancySpec(ApiModel):
    """How the router tells tenants apart. Budgets apply per tenant."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.source != 'APIKey' || has(self.apiKeysSecretRef)",
             message="source APIKey needs apiKeysSecretRef",
             check=lambda s: s.source != "APIKey" or s.api_keys_secret_ref is not None,
             field_path=".apiKeysSecretRef", reason="FieldValueRequired"),
    )

    source: Literal["Header", "APIKey"] = Field(
        default="Header",
        description="Header: the tenant is the value of `header`, which must be set by a trusted "
                    "gateway (the router strips it from untrusted clients). APIKey: the tenant "
                    "is looked up from the bearer token in apiKeysSecretRef.")
    header: str = Field(default="x-kvroute-tenant", max_length=256, pattern=HEADER_NAME,
                        description="Header carrying the tenant (source Header).")
    api_keys_secret_ref: LocalObjectReference | None = Field(
        default=None, alias="apiKeysSecretRef",
        description="Secret whose keys are tenants and values are their API keys.")
    default_tenant: str = Field(default="anonymous", max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                                description="Tenant of requests that carry none.")


class BudgetSpec(ApiModel):
    """A spending or capacity limit for one tenant (or all, with tenant "*")."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.usd) || has(self.tokensPerMinute) || has(self.requestsPerMinute) || "
                 "has(self.maxConcurrency)",
             message="a budget needs at least one limit: usd, tokensPerMinute, "
                     "requestsPerMinute or maxConcurrency",
             check=lambda s: any(v is not None for v in (
                 s.usd, s.tokens_per_minute, s.requests_per_minute, s.max_concurrency)),
             reason="FieldValueRequired"),
    )

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      description="Budget name, unique in the policy (metrics label).")
    tenant: str = Field(default="*", max_length=253, pattern=r"^(\*|[-._a-zA-Z0-9]+)$",
                        description="Tenant the budget applies to; * applies to each tenant "
                                    "separately.")
    usd: float | None = Field(default=None, gt=0, le=1e9,
                              description="Most USD the tenant may spend per window.")
    window: Literal["1m", "1h", "1d", "7d", "30d"] = Field(
        default="1d", description="Window of the usd limit (rolling).")
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**12,
                                          description="Most tokens (prompt + output) per minute.")
    requests_per_minute: int | None = Field(default=None, ge=1, le=10**9,
                                            description="Most requests per minute.")
    max_concurrency: int | None = Field(default=None, ge=1, le=10**6,
                                        description="Most requests in flight at once.")
    on_exhausted: Literal["Reject", "Downgrade"] = Field(
        default="Reject",
        description="Reject: answer 429. Downgrade: route to the cheapest pool that the "
                    "remaining budget affords, else 429.")


class BudgetStoreSpec(ApiModel):
    """What budgeted requests get when the shared budget store (Redis) fails."""

    on_error: Literal["FailOpen", "FailClosed"] = Field(
        default="FailOpen",
        description="When the budget store cannot be reached or does not answer within "
                    "timeoutMs: FailOpen admits the request without metering it (availability "
                    "first; spend during the outage is not counted against budgets), "
                    "FailClosed refuses it with 503 code budget_store_unavailable (budgets "
                    "are never overspent). Either way the router counts "
                    "kvroute_budget_store_errors_total and logs the error.")
    timeout_ms: int = Field(default=250, ge=10, le=10000,
                            description="Longest a budget store call may take before onError "
                                        "applies, in milliseconds.")


class BatchingSpec(ApiModel):
    """Batch-level routing: requests arriving within the window are assigned to pools jointly
    under the cost budget and each pool's free capacity."""

    enabled: bool = Field(default=True, description="Assign requests to pools in batches.")
    window_ms: int = Field(default=5, ge=0, le=1000,
                           description="How long the router gathers a batch, in milliseconds.")
    max_batch_size: int = Field(default=64, ge=1, le=4096,
                                description="Largest batch assigned at once.")


class PriorityClass(ApiModel):
    """A request priority (chosen by the x-kvroute-priority header)."""

    name: str = Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      description="Name clients send in x-kvroute-priority.")
    priority: int = Field(ge=-1000, le=1000, description="Higher is served first.")
    sheddable: bool = Field(default=False,
                            description="Whether requests of this class are shed (429) under "
                                        "saturation instead of queued.")


class AdmissionSpec(ApiModel):
    """What the router admits, queues or sheds."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="!has(self.defaultPriorityClass) || "
                 "self.priorityClasses.exists(p, p.name == self.defaultPriorityClass)",
             message="defaultPriorityClass must name one of priorityClasses",
             check=lambda s: s.default_priority_class is None
             or any(p.name == s.default_priority_class for p in s.priority_classes),
             field_path=".defaultPriorityClass"),
    )

    max_prompt_tokens: int | None = Field(default=None, ge=1, le=10_485_760,
                                          description="Longer prompts are rejected with 413.")
    max_output_tokens: int | None = Field(default=None, ge=1, le=10_485_760,
                                          description="Larger max_tokens are rejected with 400.")
    max_queue_depth: int = Field(default=1024, ge=0, le=1_000_000,
                                 description="Requests the router holds while every endpoint "
                                             "is saturated; beyond it requests get 429.")
    queue_timeout_ms: int = Field(default=30000, ge=0, le=3_600_000,
                                  description="How long a request may wait in the router's "
                                              "queue before it gets 429.")
    saturation_queue_depth: int = Field(
        default=8, ge=1, le=100000,
        description="An endpoint with this many waiting requests counts as saturated (admission "
                    "queues or sheds when all are); one this many deeper than the median "
                    "endpoint's queue (a hot spot) stops attracting its prefixes.")
    saturation_kv_utilization: float = Field(
        default=1.0, gt=0, le=1,
        description="An endpoint whose KV-cache usage (vllm:kv_cache_usage_perc, 0-1) reaches "
                    "this counts as saturated: it stops attracting its prefixes and, when all "
                    "are, requests queue. Default 1 (only a full cache): vLLM fills its cache "
                    "by design and queues what does not fit, which saturationQueueDepth sees.")
    newest_first_after_ms: int | None = Field(
        default=None, ge=0, le=3_600_000,
        description="Adaptive LIFO for overload (unset: off, first come first served). Once "
                    "the oldest request in the router's queue has waited this long, the queue "
                    "lets the newest go first (within a priority class), and those requests ask "
                    "the engines for the head of their queues too (vLLM priority scheduling, "
                    "InferencePool spec.engine.schedulingPolicy Priority). Under sustained "
                    "overload most requests keep a short time to first token while the oldest "
                    "wait up to queueTimeoutMs: more requests meet a TTFT objective (goodput), "
                    "a longer tail. Replicas release their own newest; the fleet-wide oldest-"
                    "first order does not apply while it is on. Emulated fleet numbers: "
                    "docs/benchmarks/emulated-fleet.md, round 43.")
    priority_classes: list[PriorityClass] = Field(default_factory=list, max_length=16,
                                                  description="Request priorities.")
    default_priority_class: str | None = Field(default=None, max_length=63,
                                               description="Priority of requests naming none.")


class DifficultySpec(ApiModel):
    """Difficulty routing: hard prompts go to strong pools, easy ones to cheap pools."""

    enabled: bool = Field(default=False, description="Route by estimated prompt difficulty.")
    strong_share: float = Field(
        default=0.3, ge=0, le=1,
        description="Target share of requests sent to the strong tier (the primary pools of "
                    "highest quality.score, else quality.tier); the rest go to the others.")
    estimator: Literal["heuristic", "knn-hashed", "knn-minilm"] = Field(
        default="heuristic",
        description="Quality estimator that scores each prompt: heuristic (length, digits, "
                    "keywords; no data), knn-hashed (kNN over the router's labelled data, "
                    "hashed TF-IDF), knn-minilm (the same kNN over all-MiniLM-L6-v2 "
                    "embeddings). The kNN estimators need the router's --quality-data, "
                    "else the heuristic is used.")


class ResponseCacheSpec(ApiModel):
    """Reuse of earlier answers (exact, then semantic)."""

    cache_tier_ref: LocalObjectReference = Field(description="CacheTier holding the responses.")
    similarity_threshold: float | None = Field(
        default=None, ge=0.5, le=1,
        description="Cosine similarity above which a cached answer is reused; overrides the "
                    "CacheTier's threshold; 1 means exact matches only.")
    ttl_seconds: int | None = Field(default=None, ge=1, le=31_536_000,
                                    description="Lifetime of entries; overrides the CacheTier.")
    scope: Literal["Tenant", "Global"] = Field(
        default="Tenant", description="Tenant: answers are reused within a tenant only.")
    allow_sampling: bool = Field(
        default=False, description="Also cache requests with temperature > 0.")


class RetrySpec(ApiModel):
    """Retries of requests whose endpoint fails before the first byte."""

    max_attempts: int = Field(default=3, ge=1, le=10,
                              description="Attempts in total, on distinct endpoints.")
    per_try_timeout_ms: int = Field(
        default=10000, ge=100, le=600000,
        description="Time to first byte allowed per attempt of a stream while its endpoint "
                    "answers nothing else: an endpoint that started answering another request "
                    "of this router's (or, with replica sync, another replica's) in that time "
                    "is busy, not stuck, so the attempt waits another perTryTimeoutMs (up to "
                    "requestTimeoutSeconds) instead of being sent elsewhere to be computed "
                    "again.")


class RoutePolicySpec(ApiModel):
    """Desired state of a RoutePolicy."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.pools.all(a, self.pools.exists_one(b, b.name == a.name))",
             message="each pool may be listed only once",
             check=lambda s: len({p.name for p in s.pools}) == len(s.pools),
             field_path=".pools", reason="FieldValueDuplicate"),
        Rule(cel="self.budgets.all(a, self.budgets.exists_one(b, b.name == a.name))",
             message="budget names must be unique",
             check=lambda s: len({b.name for b in s.budgets}) == len(s.budgets),
             field_path=".budgets", reason="FieldValueDuplicate"),
        Rule(cel="self.pools.exists(p, p.role == 'primary' && p.weight > 0)",
             message="at least one pool must be a primary pool with weight > 0",
             check=lambda s: any(p.role == "primary" and p.weight > 0 for p in s.pools),
             field_path=".pools"),
        Rule(cel="!has(self.difficulty) || !self.difficulty.enabled || size(self.pools) >= 2",
             message="difficulty routing needs at least two pools (a weak and a strong one)",
             check=lambda s: s.difficulty is None or not s.difficulty.enabled
             or len(s.pools) >= 2,
             field_path=".difficulty.enabled"),
    )

    match: MatchSpec = Field(description="Which requests this policy routes.")
    pools: list[PoolTarget] = Field(min_length=1, max_length=16,
                                    description="Pools that serve the traffic.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec,
                                 description="Endpoint scoring inside a pool.")
    tenancy: TenancySpec = Field(default_factory=TenancySpec,
                                 description="How tenants are identified.")
    budgets: list[BudgetSpec] = Field(default_factory=list, max_length=32,
                                      description="Cost and capacity budgets per tenant.")
    budget_store: BudgetStoreSpec = Field(
        default_factory=BudgetStoreSpec,
        description="Behaviour of budgeted requests when the shared budget store fails.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec,
                                   description="Batch-level routing.")
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec,
                                     description="Admission control and shedding.")
    difficulty: DifficultySpec | None = Field(default=None, description="Difficulty routing.")
    response_cache: ResponseCacheSpec | None = Field(default=None,
                                                     description="Response cache.")
    retries: RetrySpec = Field(default_factory=RetrySpec, description="Retry behaviour.")
    request_timeout_seconds: int = Field(default=600, ge=1, le=86400,
                                         description="Longest a request may take end to end.")


class BudgetStatus(ApiModel):
    """Usage of one budget (as counted by the routers, via Prometheus)."""

    name: str = Field(max_length=63, description="Budget name.")
    tenant: str = Field(default="*", max_length=253, description="Tenant.")
    spent_usd: float | None = Field(default=None, ge=0, alias="spentUSD",
                                    description="USD spent in the current window.")
    limit_usd: float | None = Field(default=None, ge=0, alias="limitUSD",
                                    description="USD limit of the window.")
    window: str = Field(default="", max_length=8, description="Window of the usd limit.")
    percent_used: int = Field(default=0, ge=0, description="Highest usage of any limit, in %.")


class RoutePolicyStatus(ApiModel):
    """Observed state of a RoutePolicy."""

    observed_generation: int | None = Field(default=None, ge=0,
                                            description="Generation this status describes.")
    resolved_pools: list[str] = Field(default_factory=list, max_length=16,
                                      description="Pools that exist and were resolved.")
    budgets: list[BudgetStatus] = Field(default_factory=list, max_length=32,
                                        description="Usage of each budget.")
    budget_used_percent: int | None = Field(default=None, ge=0,
                                            description="Highest usage of any budget, in %.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16,
                                        description="Accepted, ResolvedRefs and BudgetExhausted.")


class RoutePolicy(ResourceBase):
    """How traffic for one model name is spread over pools, within budgets."""

    KIND: ClassVar[str] = "RoutePolicy"
    PLURAL: ClassVar[str] = "routepolicies"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("rp",)

    spec: RoutePolicySpec = Field(description="Desired routing behaviour.")
    status: RoutePolicyStatus | None = Field(default=None,
                                             description="Observed state of the policy.")


__all__ = [
    "CONDITION_REASON",
    "AdmissionSpec",
    "BudgetSpec",
    "PickerType",
    "RoutePolicy",
    "RoutePolicySpec",
    "ScorerType",
    "ScoringSpec",
    "SecretKeyReference",
]

"""InferencePool: a fleet of identical vLLM servers for one model (short name ``ipool``).

``Managed`` pools are deployed by the operator; ``External`` pools adopt servers that already
run (a label selector in a cluster, or static endpoints for the no-cluster embedded mode).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kvroute_api.meta import (
    DNS_LABEL,
    QUANTITY,
    ApiModel,
    Condition,
    LocalObjectReference,
    ResourceBase,
    Rule,
    SecretKeyReference,
)

MODEL_SOURCE = r"^(hf://[A-Za-z0-9][-._A-Za-z0-9]*(/[-._A-Za-z0-9]+)?|pvc://[a-z0-9][-a-z0-9.]*(/.*)?|s3://[a-z0-9][-a-z0-9.]*(/.*)?)$"
HOST_PORT = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([-.A-Za-z0-9]*[A-Za-z0-9])?):[0-9]{1,5}$"
ZMQ_ENDPOINT = r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9*]([-.A-Za-z0-9]*[A-Za-z0-9])?):[0-9]{1,5}$"
HashAlgo = Literal["sha256_cbor", "sha256"]


class ModelSpec(ApiModel):
    """Which model the pool serves and where its weights come from."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][-._/:A-Za-z0-9]*$",
                      description="Served model name: the `model` clients and RoutePolicies use "
                                  "(vLLM --served-model-name), e.g. llama-3.1-8b-instruct.")
    source: str | None = Field(
        default=None, max_length=1024, pattern=MODEL_SOURCE,
        description="Where the weights come from: hf://ORG/NAME (Hugging Face), "
                    "pvc://CLAIM/PATH (a PersistentVolumeClaim in the namespace) or "
                    "s3://BUCKET/PATH (copied by an init container). Required for Managed pools.")
    revision: str | None = Field(default=None, max_length=256, pattern=r"^[-._/A-Za-z0-9]+$",
                                 description="Hugging Face revision (branch, tag or commit).")
    hf_token_secret_ref: SecretKeyReference | None = Field(
        default=None, description="Secret key holding a Hugging Face token for gated models.")
    s3_credentials_secret_ref: LocalObjectReference | None = Field(
        default=None, description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3:// "
                                  "sources.")


class EnvVar(ApiModel):
    """An environment variable for the engine container."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
                      description="Variable name.")
    value: str = Field(default="", max_length=32768, description="Variable value.")


class KVEventsSpec(ApiModel):
    """vLLM KV-cache events (ZMQ), which the router's precise prefix index consumes."""

    enabled: bool = Field(default=True, description="Publish KV-cache events from every engine.")
    port: int = Field(default=5557, ge=1024, le=65535,
                      description="Port of the ZMQ PUB socket (vLLM binds tcp://*:PORT).")
    replay_port: int = Field(default=5558, ge=1024, le=65535,
                             description="Port of the ZMQ replay (ROUTER) socket used to recover "
                                         "missed events.")
    pending_ms: int = Field(
        default=5000, ge=0, le=3_600_000,
        description="How long the router counts a dispatched request's prompt blocks as cached "
                    "on its pod before the pod's events confirm them (0 turns it off). It "
                    "keeps a burst of same-prefix requests together while the first is still "
                    "queued or in prefill; set it above the pods' usual queue + prefill time "
                    "under load, and not far above it: a request that fails before caching "
                    "keeps attracting its prefix for this long.")
    eviction_forecast: bool = Field(
        default=True,
        description="Forecast the evictions a dispatch causes: vLLM evicts cached blocks when "
                    "it schedules the request that needs their room but announces it only "
                    "when that step ends, so the router would keep sending a prefix's "
                    "requests to a pod that is dropping it. With this on, once a pod's KV "
                    "cache is full (its num_gpu_blocks, from cache_config_info) the router "
                    "hides, at each dispatch, as many of the pod's least recently used blocks "
                    "as the request will fill, until the pod confirms the eviction or for at "
                    "most pendingMs. Measured on 64 emulated H100 engines: TTFT p90 -27 % "
                    "and -25 %, goodput +20 % and +11 %, hits 3 points lower "
                    "(docs/benchmarks/emulated-fleet.md, round 29). Off: the router learns "
                    "an eviction only from the pod's events.")


class EngineSpec(ApiModel):
    """How each vLLM server runs."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.extraArgs.all(a, !a.startsWith('--scheduling-policy'))",
             message="set the engines' scheduling policy with spec.engine.schedulingPolicy, not "
                     "extraArgs: the router reads it to decide whether it sets each request's "
                     "priority",
             check=lambda s: not any(a.startswith("--scheduling-policy") for a in s.extra_args),
             field_path=".extraArgs", reason="FieldValueForbidden"),
    )

    image: str = Field(default="vllm/vllm-openai:v0.32.0", min_length=1, max_length=512,
                       description="Container image of the vLLM OpenAI-compatible server.")
    port: int = Field(default=8000, ge=1024, le=65535,
                      description="HTTP port the engine serves the OpenAI API and /metrics on.")
    block_size: int = Field(default=16, ge=1, le=1024,
                            description="KV-cache block size in tokens (vLLM --block-size). The "
                                        "router hashes prompts in blocks of this size.")
    prefix_caching_hash_algo: HashAlgo = Field(
        default="sha256_cbor",
        description="Prefix-cache block hash algorithm (vLLM --prefix-caching-hash-algo); the "
                    "router recomputes the same hashes to find cached prefixes.")
    max_model_len: int | None = Field(default=None, ge=16, le=10_485_760,
                                      description="Maximum context length in tokens "
                                                  "(vLLM --max-model-len).")
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536,
                                     description="Maximum concurrent sequences per replica "
                                                 "(vLLM --max-num-seqs).")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64,
                                      description="GPUs one replica shards the model over "
                                                  "(vLLM --tensor-parallel-size).")
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors",
                          "gguf"] | None = Field(
        default=None, description="Weight quantization method (vLLM --quantization).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weight and activation dtype (vLLM --dtype).")
    gpu_memory_utilization: float | None = Field(
        default=None, ge=0.05, le=0.99,
        description="Fraction of GPU memory vLLM may use (vLLM --gpu-memory-utilization).")
    kv_events: KVEventsSpec = Field(default_factory=KVEventsSpec,
                                    description="KV-cache event publishing.")
    scheduling_policy: Literal["FCFS", "Priority"] = Field(
        default="FCFS",
        description="The order in which each engine admits its waiting requests (vLLM "
                    "--scheduling-policy). FCFS: arrival order. Priority: by each request's "
                    "`priority` field, which the router then owns: it overwrites what a client "
                    "sent with arrival time plus the policy's scoring.prefillPriorityMsPerToken "
                    "per prompt token the chosen engine does not hold, so mostly cached prompts "
                    "go ahead of long misses (docs/router.md, Engine queue order). External "
                    "pools: declare what the engines run; the router believes it.")
    extra_args: list[str] = Field(default_factory=list, max_length=64,
                                  description="Additional vLLM command-line arguments, verbatim "
                                              "(not --scheduling-policy: set schedulingPolicy, "
                                              "which the router reads).")
    env: list[EnvVar] = Field(default_factory=list, max_length=64,
                              description="Additional environment variables of the engine.")

    @property
    def ranks_by_priority(self) -> bool:
        """The engines admit waiting requests by the ``priority`` the router writes
        (``schedulingPolicy: Priority``)."""
        return self.scheduling_policy == "Priority"


class AutoscalingSpec(ApiModel):
    """Opt-in autoscaling from Prometheus metrics of the pool's engines."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.minReplicas <= self.maxReplicas",
             message="minReplicas must be less than or equal to maxReplicas",
             check=lambda s: s.min_replicas <= s.max_replicas, field_path=".minReplicas"),
        Rule(cel="has(self.targetQueueDepth) || has(self.targetKVCacheUtilization)",
             message="autoscaling needs a target: set targetQueueDepth and/or "
                     "targetKVCacheUtilization",
             check=lambda s: s.target_queue_depth is not None
             or s.target_kv_cache_utilization is not None,
             reason="FieldValueRequired"),
    )

    enabled: bool = Field(default=True, description="Whether the operator scales this pool.")
    min_replicas: int = Field(default=1, ge=0, le=1000, description="Lower bound of replicas.")
    max_replicas: int = Field(ge=1, le=1000, description="Upper bound of replicas.")
    target_queue_depth: float | None = Field(
        default=None, gt=0, le=10000,
        description="Desired waiting requests per replica (vllm:num_requests_waiting).")
    target_kv_cache_utilization: float | None = Field(
        default=None, gt=0, le=1, alias="targetKVCacheUtilization",
        description="Desired KV-cache usage per replica, 0-1 (vllm:kv_cache_usage_perc).")
    scale_up_stabilization_seconds: int = Field(
        default=60, ge=0, le=3600,
        description="How long a higher recommendation must hold before scaling up.")
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=86400,
        description="How long a lower recommendation must hold before scaling down.")
    max_step: int = Field(default=2, ge=1, le=100,
                          description="Most replicas added or removed in one step.")
    interval_seconds: int = Field(default=30, ge=5, le=3600,
                                  description="How often the operator evaluates the pool.")
    prometheus_url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^\s]+$",
        description="Prometheus base URL; defaults to the operator's --prometheus-url.")
    dry_run: bool = Field(default=False,
                          description="Only write the recommendation to status; do not scale.")


class ResourcesSpec(ApiModel):
    """Compute resources of one replica."""

    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per replica (0 for CPU engines).")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu", max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-_a-zA-Z0-9.]+$",
        description="Extended resource name that schedules the GPUs, e.g. nvidia.com/gpu or "
                    "amd.com/gpu.")
    cpu: str | None = Field(default=None, max_length=64, pattern=QUANTITY,
                            description="CPU request and limit per replica, e.g. '8'.")
    memory: str | None = Field(default=None, max_length=64, pattern=QUANTITY,
                               description="Memory request and limit per replica, e.g. 64Gi.")
    shared_memory: str = Field(default="8Gi", max_length=64, pattern=QUANTITY,
                               description="Size of the /dev/shm memory volume (tensor parallel "
                                           "workers exchange data through it).")


class Toleration(ApiModel):
    """A Kubernetes toleration for the engine pods."""

    key: str | None = Field(default=None, max_length=316, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal",
                                                 description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all effects when unset.")
    toleration_seconds: int | None = Field(default=None, ge=0,
                                           description="How long a NoExecute taint is tolerated.")


class CostSpec(ApiModel):
    """What the pool costs; budgeted routing charges requests with it."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.perGPUHourUSD) || has(self.perMillionInputTokensUSD) || "
                 "has(self.perMillionOutputTokensUSD)",
             message="cost needs at least one of perGPUHourUSD, perMillionInputTokensUSD, "
                     "perMillionOutputTokensUSD",
             check=lambda s: any(v is not None for v in (
                 s.per_gpu_hour_usd, s.per_million_input_tokens_usd,
                 s.per_million_output_tokens_usd)),
             reason="FieldValueRequired"),
    )

    per_gpu_hour_usd: float | None = Field(default=None, ge=0, le=10000, alias="perGPUHourUSD",
                                           description="Price of one GPU for one hour, USD.")
    per_million_input_tokens_usd: float | None = Field(
        default=None, ge=0, le=10000, alias="perMillionInputTokensUSD",
        description="Price of one million prompt tokens, USD.")
    per_million_output_tokens_usd: float | None = Field(
        default=None, ge=0, le=10000, alias="perMillionOutputTokensUSD",
        description="Price of one million generated tokens, USD.")


class CapacitySpec(ApiModel):
    """How much one replica can serve; the batch router never assigns more."""

    max_concurrent_sequences_per_replica: int | None = Field(
        default=None, ge=1, le=65536, description="Sequences one replica serves at once.")
    tokens_per_second_per_replica: float | None = Field(
        default=None, gt=0, le=10_000_000,
        description="Sustained tokens/s (prompt + output) one replica serves.")


class QualitySpec(ApiModel):
    """How good the pool's answers are; difficulty routing sends hard prompts to better pools."""

    tier: Literal["weak", "standard", "strong"] = Field(
        default="standard", description="Quality tier: weak, standard or strong.")
    score: float | None = Field(default=None, ge=0, le=1,
                                description="Measured quality in 0-1 (e.g. benchmark accuracy); "
                                            "used instead of the tier when set.")


class LabelSelector(ApiModel):
    """Selects existing pods by labels (External pools)."""

    match_labels: dict[str, str] = Field(
        min_length=1, max_length=32,
        description="Labels a pod must carry to be an endpoint of this pool.")


class StaticEndpoint(ApiModel):
    """A server address for External pools without a cluster (embedded mode)."""

    name: str | None = Field(default=None, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                             description="Display name of the endpoint (defaults to address).")
    address: str = Field(max_length=260, pattern=HOST_PORT,
                         description="host:port of the engine's HTTP server.")
    kv_events_endpoint: str | None = Field(
        default=None, max_length=270, pattern=ZMQ_ENDPOINT,
        description="ZMQ endpoint of the engine's KV-event publisher, tcp://host:port.")
    kv_events_replay_endpoint: str | None = Field(
        default=None, max_length=270, pattern=ZMQ_ENDPOINT,
        description="ZMQ endpoint of the engine's KV-event replay socket, tcp://host:port.")


class InferencePoolSpec(ApiModel):
    """Desired state of an InferencePool."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.mode != 'Managed' || has(self.model.source)",
             message="Managed pools need spec.model.source (hf://, pvc:// or s3://)",
             check=lambda s: s.mode != "Managed" or s.model.source is not None,
             field_path=".model.source", reason="FieldValueRequired"),
        Rule(cel="self.mode != 'External' || has(self.selector) || "
                 "(has(self.endpoints) && size(self.endpoints) > 0)",
             message="External pools need spec.selector or spec.endpoints",
             check=lambda s: s.mode != "External" or s.selector is not None
             or bool(s.endpoints),
             reason="FieldValueRequired"),
        Rule(cel="self.mode != 'Managed' || !has(self.endpoints) || size(self.endpoints) == 0",
             message="spec.endpoints is only for External pools; Managed pools get their "
                     "endpoints from the pods the operator creates",
             check=lambda s: s.mode != "Managed" or not s.endpoints,
             field_path=".endpoints", reason="FieldValueForbidden"),
        Rule(cel="!has(self.autoscaling) || !self.autoscaling.enabled || "
                 "(self.replicas >= self.autoscaling.minReplicas && "
                 "self.replicas <= self.autoscaling.maxReplicas)",
             message="spec.replicas must lie within autoscaling minReplicas..maxReplicas",
             check=lambda s: s.autoscaling is None or not s.autoscaling.enabled
             or s.autoscaling.min_replicas <= s.replicas <= s.autoscaling.max_replicas,
             field_path=".replicas"),
        Rule(cel="self.resources.gpus == 0 || "
                 "self.engine.tensorParallelSize <= self.resources.gpus",
             message="engine.tensorParallelSize must not exceed resources.gpus",
             check=lambda s: s.resources.gpus == 0
             or s.engine.tensor_parallel_size <= s.resources.gpus,
             field_path=".engine.tensorParallelSize"),
        Rule(cel="!has(self.cost) || !has(self.cost.perGPUHourUSD) || "
                 "(has(self.capacity) && has(self.capacity.tokensPerSecondPerReplica))",
             message="cost.perGPUHourUSD needs capacity.tokensPerSecondPerReplica (the router "
                     "turns the hourly price into a price per token with it; without it the "
                     "pool would cost nothing)",
             check=lambda s: s.cost is None or s.cost.per_gpu_hour_usd is None
             or (s.capacity is not None
                 and s.capacity.tokens_per_second_per_replica is not None),
             field_path=".capacity.tokensPerSecondPerReplica", reason="FieldValueRequired"),
    )

    mode: Literal["Managed", "External"] = Field(
        default="Managed",
        description="Managed: the operator deploys and scales vLLM. External: adopt existing "
                    "servers (selector or static endpoints); nothing is deployed.")
    model: ModelSpec = Field(description="The model served by the pool.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine settings.")
    replicas: int = Field(default=1, ge=0, le=1000,
                          description="Desired number of engine replicas (scale subresource).")
    autoscaling: AutoscalingSpec | None = Field(default=None,
                                                description="Opt-in autoscaling.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     description="Resources of one replica.")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32,
                                          description="Node labels the engine pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32,
                                          description="Tolerations of the engine pods.")
    cost: CostSpec | None = Field(default=None, description="Price of the pool's service.")
    capacity: CapacitySpec | None = Field(default=None,
                                          description="Serving capacity of one replica.")
    quality: QualitySpec = Field(default_factory=QualitySpec,
                                 description="Answer quality, for difficulty routing.")
    cache_tier_ref: LocalObjectReference | None = Field(
        default=None, description="CacheTier whose KV offload settings the engines use.")
    selector: LabelSelector | None = Field(default=None,
                                           description="External pools: pods to adopt.")
    endpoints: list[StaticEndpoint] = Field(
        default_factory=list, max_length=256,
        description="External pools without a cluster: static engine addresses.")
    direct_access: bool = Field(
        default=False,
        description="Let clients name this pool's served model (spec.model.name) directly. "
                    "When a RoutePolicy targets the pool, its served name is otherwise not a "
                    "model clients may use (404, not listed by /v1/models), so no request "
                    "escapes the policy's budgets; with true, the served name routes through "
                    "a default policy (admission control, the router's output bound, no "
                    "budgets). A pool no RoutePolicy targets is always reachable directly.")


class PoolEndpointStatus(ApiModel):
    """One engine of the pool as the operator last saw it."""

    name: str = Field(max_length=253, description="Pod (or static endpoint) name.")
    address: str = Field(default="", max_length=260, description="host:port of the engine.")
    ready: bool = Field(default=False, description="Whether the engine passes its probes.")


class InferencePoolStatus(ApiModel):
    """Observed state of an InferencePool."""

    observed_generation: int | None = Field(default=None, ge=0,
                                            description="Generation this status describes.")
    replicas: int = Field(default=0, ge=0, description="Engine replicas that exist.")
    ready_replicas: int = Field(default=0, ge=0, description="Replicas ready to serve.")
    selector: str | None = Field(default=None, max_length=4096,
                                 description="Label selector of the pool's pods, as a string "
                                             "(used by kubectl scale and HPAs).")
    endpoints: list[PoolEndpointStatus] = Field(default_factory=list, max_length=1000,
                                                description="The pool's engines.")
    prefix_cache_hit_rate: str | None = Field(
        default=None, max_length=16, pattern=r"^[0-9]{1,3}(\.[0-9])?%$",
        description="Engine-reported prefix-cache hit rate over the last window, e.g. 73.5%.")
    recommended_replicas: int | None = Field(
        default=None, ge=0, description="The autoscaler's latest recommendation.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16,
                                        description="Ready, Progressing and Degraded.")


class InferencePool(ResourceBase):
    """A fleet of identical vLLM servers for one model."""

    KIND: ClassVar[str] = "InferencePool"
    PLURAL: ClassVar[str] = "inferencepools"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ipool",)

    spec: InferencePoolSpec = Field(description="Desired state of the pool.")
    status: InferencePoolStatus | None = Field(default=None,
                                               description="Observed state of the pool.")


__all__ = [
    "DNS_LABEL",
    "AutoscalingSpec",
    "CapacitySpec",
    "CostSpec",
    "EngineSpec",
    "InferencePool",
    "InferencePoolSpec",
    "InferencePoolStatus",
    "ModelSpec",
    "QualitySpec",
    "ResourcesSpec",
    "StaticEndpoint",
]

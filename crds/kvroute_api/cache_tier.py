"""CacheTier: where reusable work is kept (short name ``ct``) — KV-cache offload for the pools
that reference it, and the response cache the routers use."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kvroute_api.meta import ApiModel, Condition, ResourceBase, Rule, SecretKeyReference


class KVOffloadSpec(ApiModel):
    """KV-cache offload for the engines of pools that reference this tier."""

    cpu_offload_gib: float = Field(
        gt=0, le=4096, alias="cpuOffloadGiB",
        description="CPU memory per replica, GiB, that vLLM's native offloading keeps evicted "
                    "KV blocks in (vLLM --kv-offloading-size).")


class RedisSpec(ApiModel):
    """Connection to a Redis server."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.url) || has(self.urlSecretRef)",
             message="redis needs url or urlSecretRef",
             check=lambda s: s.url is not None or s.url_secret_ref is not None,
             reason="FieldValueRequired"),
    )

    url: str | None = Field(default=None, max_length=2048, pattern=r"^rediss?://[^\s]+$",
                            description="redis:// or rediss:// URL without credentials.")
    url_secret_ref: SecretKeyReference | None = Field(
        default=None, description="Secret key holding the full URL (with credentials).")
    key_prefix: str = Field(default="kvroute:", max_length=64,
                            description="Prefix of every key kvroute writes.")


class ResponseCacheTierSpec(ApiModel):
    """The response cache: answers reused for identical or similar requests."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.backend != 'redis' || has(self.redis)",
             message="backend redis needs response.redis",
             check=lambda s: s.backend != "redis" or s.redis is not None,
             field_path=".redis", reason="FieldValueRequired"),
    )

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: per router replica. redis: shared by all replicas.")
    redis: RedisSpec | None = Field(default=None, description="Redis server (backend redis).")
    embedding_model: str = Field(
        default="all-MiniLM-L6-v2", max_length=256,
        description="Sentence-embedding model of the semantic lookup (runs in the router).")
    similarity_threshold: float = Field(
        default=0.98, ge=0.5, le=1,
        description="Cosine similarity above which a cached answer is reused; 1 = exact only. "
                    "0.98 keeps false hits at or below 1 % on paraphrase pairs "
                    "(docs/benchmarks/response-cache.md).")
    ttl_seconds: int = Field(default=3600, ge=1, le=31_536_000,
                             description="Lifetime of an entry.")
    max_entries: int = Field(default=100_000, ge=1, le=100_000_000,
                             description="Most entries kept; least recently used go first.")


class CacheTierSpec(ApiModel):
    """Desired state of a CacheTier."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.kv) || has(self.response)",
             message="a CacheTier needs kv and/or response",
             check=lambda s: s.kv is not None or s.response is not None,
             reason="FieldValueRequired"),
    )

    kv: KVOffloadSpec | None = Field(default=None, description="KV-cache offload.")
    response: ResponseCacheTierSpec | None = Field(default=None, description="Response cache.")


class CacheTierStatus(ApiModel):
    """Observed state of a CacheTier."""

    observed_generation: int | None = Field(default=None, ge=0,
                                            description="Generation this status describes.")
    pools: list[str] = Field(default_factory=list, max_length=256,
                             description="Pools that reference this tier.")
    entries: int | None = Field(default=None, ge=0, description="Response-cache entries.")
    hit_rate: str | None = Field(default=None, max_length=16, pattern=r"^[0-9]{1,3}(\.[0-9])?%$",
                                 description="Response-cache hit rate, e.g. 12.5%.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16,
                                        description="Ready.")


class CacheTier(ResourceBase):
    """Where reusable work is kept."""

    KIND: ClassVar[str] = "CacheTier"
    PLURAL: ClassVar[str] = "cachetiers"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ct",)

    spec: CacheTierSpec = Field(description="Desired cache settings.")
    status: CacheTierStatus | None = Field(default=None, description="Observed state.")

"""What a request costs on a pool, from the InferencePool's ``spec.cost``, ``spec.capacity``
and ``spec.quality``: the economics the ledger charges and the batch solver optimises.

USD = prompt tokens x input price + output tokens x output price (per million). A pool priced
only per GPU-hour is converted to a per-token price through its throughput: GPU-hour price x
GPUs per replica / (3600 x tokens/s per replica). A pool with no usable price costs 0 (and
``PoolEconomics.priced`` is False, so the operator can warn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvroute_api.inference_pool import InferencePoolSpec

Tier = Literal["weak", "standard", "strong"]
"""A pool's quality tier (``InferencePool.spec.quality.tier``)."""


@dataclass(frozen=True)
class PoolEconomics:
    """Prices, capacity and quality tier of one pool."""

    name: str
    usd_per_input_token: float
    usd_per_output_token: float
    tier: Tier = "standard"
    quality_score: float | None = None
    replicas: int = 1
    max_sequences_per_replica: int | None = None
    tokens_per_second_per_replica: float | None = None
    priced: bool = True

    def request_usd(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens * self.usd_per_input_token
                + output_tokens * self.usd_per_output_token)

    def free_sequences(self, in_flight: int) -> int | None:
        """Sequences the pool can still take (replicas x max sequences - in flight)."""
        if self.max_sequences_per_replica is None:
            return None
        return max(0, self.replicas * self.max_sequences_per_replica - in_flight)

    @classmethod
    def from_spec(cls, name: str, spec: InferencePoolSpec,
                  ready_replicas: int | None = None) -> PoolEconomics:
        cost = spec.cost
        capacity = spec.capacity
        tokens_per_second = capacity.tokens_per_second_per_replica if capacity else None
        per_in = per_out = 0.0
        priced = False
        if cost is not None:
            if cost.per_million_input_tokens_usd is not None:
                per_in, priced = cost.per_million_input_tokens_usd / 1e6, True
            if cost.per_million_output_tokens_usd is not None:
                per_out, priced = cost.per_million_output_tokens_usd / 1e6, True
            if cost.per_gpu_hour_usd is not None and tokens_per_second:
                per_token = (cost.per_gpu_hour_usd * max(1, spec.resources.gpus)
                             / (3600.0 * tokens_per_second))
                if cost.per_million_input_tokens_usd is None:
                    per_in = per_token
                if cost.per_million_output_tokens_usd is None:
                    per_out = per_token
                priced = True
        return cls(
            name=name, usd_per_input_token=per_in, usd_per_output_token=per_out,
            tier=spec.quality.tier, quality_score=spec.quality.score,
            replicas=ready_replicas if ready_replicas is not None else spec.replicas,
            max_sequences_per_replica=(capacity.max_concurrent_sequences_per_replica
                                       if capacity else None) or spec.engine.max_num_seqs,
            tokens_per_second_per_replica=tokens_per_second, priced=priced)

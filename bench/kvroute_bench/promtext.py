"""Engine metrics for the benchmark: parse vLLM's Prometheus text, and the deltas of a run.

The harness scrapes every engine's ``/metrics`` before and after a contender's measured
window; :func:`engine_deltas` turns the two snapshots into what that window did on each
engine (requests finished, prompt tokens, prefix-cache queries and hits, engine-side TTFT),
so numbers from earlier contenders or the warm-up never leak into a contender's results.
Counters are summed over all label sets (vLLM labels them by model and engine index).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Sample = tuple[str, tuple[tuple[str, str], ...]]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[Sample, float]:
    """Samples of a Prometheus text exposition, keyed by (name, sorted labels)."""
    samples: dict[Sample, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        name, _, labels_text, value_text = match.group(1, 2, 3, 4)
        labels = tuple(sorted(_LABEL.findall(labels_text or "")))
        try:
            value = float(value_text)
        except ValueError:
            continue
        samples[(name, labels)] = value
    return samples


def total(samples: Mapping[Sample, float], name: str) -> float:
    """Sum of every sample called ``name`` (all label sets); 0 when absent."""
    return sum(v for (n, _), v in samples.items() if n == name and not math.isnan(v))


# vLLM 0.32 metric names (the ``vllm:`` prefix is part of the name).
REQUESTS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
TTFT_SUM = "vllm:time_to_first_token_seconds_sum"
TTFT_COUNT = "vllm:time_to_first_token_seconds_count"
E2E_SUM = "vllm:e2e_request_latency_seconds_sum"
E2E_COUNT = "vllm:e2e_request_latency_seconds_count"
PREEMPTIONS = "vllm:num_preemptions_total"

_COUNTERS = (REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS, PREFIX_QUERIES, PREFIX_HITS,
             TTFT_SUM, TTFT_COUNT, E2E_SUM, E2E_COUNT, PREEMPTIONS)


@dataclass(frozen=True)
class EngineDelta:
    """What one engine did between two scrapes."""

    requests: float
    prompt_tokens: float
    generation_tokens: float
    prefix_queries: float
    prefix_hits: float
    ttft_sum_s: float
    ttft_count: float
    preemptions: float = 0.0  # running sequences the engine preempted (KV ran out)

    @property
    def computed_prompt_tokens(self) -> float:
        """Prompt tokens the engine had to prefill (queried minus served from cache)."""
        return max(0.0, self.prefix_queries - self.prefix_hits)


def delta(before: Mapping[Sample, float], after: Mapping[Sample, float]) -> EngineDelta:
    """One engine's counters after minus before (a counter reset reads as the after value)."""
    values: dict[str, float] = {}
    for name in _COUNTERS:
        b, a = total(before, name), total(after, name)
        values[name] = a - b if a >= b else a
    return EngineDelta(
        requests=values[REQUESTS], prompt_tokens=values[PROMPT_TOKENS],
        generation_tokens=values[GENERATION_TOKENS], prefix_queries=values[PREFIX_QUERIES],
        prefix_hits=values[PREFIX_HITS], ttft_sum_s=values[TTFT_SUM],
        ttft_count=values[TTFT_COUNT], preemptions=values[PREEMPTIONS])


@dataclass(frozen=True)
class FleetDelta:
    """A measured window over the whole fleet."""

    engines: list[EngineDelta]

    @property
    def prefix_hit_rate(self) -> float:
        """Prefix-cache hits / queries, in tokens, over every engine (vLLM's own counters)."""
        queries = sum(e.prefix_queries for e in self.engines)
        return sum(e.prefix_hits for e in self.engines) / queries if queries else 0.0

    @property
    def engine_ttft_mean_s(self) -> float:
        """Mean TTFT as the engines measured it (from the histograms' sum and count)."""
        count = sum(e.ttft_count for e in self.engines)
        return sum(e.ttft_sum_s for e in self.engines) / count if count else math.nan

    @property
    def preemptions(self) -> float:
        """Preemptions over every engine (``vllm:num_preemptions_total``)."""
        return sum(e.preemptions for e in self.engines)

    @property
    def requests_per_engine(self) -> list[float]:
        return [e.requests for e in self.engines]

    @property
    def computed_tokens_per_engine(self) -> list[float]:
        return [e.computed_prompt_tokens for e in self.engines]


def combine(deltas: Sequence[FleetDelta]) -> FleetDelta:
    """Several windows on the same engines added up, engine by engine."""
    if not deltas:
        return FleetDelta([])
    engines: list[EngineDelta] = []
    for parts in zip(*(d.engines for d in deltas), strict=True):
        engines.append(EngineDelta(
            requests=sum(e.requests for e in parts),
            prompt_tokens=sum(e.prompt_tokens for e in parts),
            generation_tokens=sum(e.generation_tokens for e in parts),
            prefix_queries=sum(e.prefix_queries for e in parts),
            prefix_hits=sum(e.prefix_hits for e in parts),
            ttft_sum_s=sum(e.ttft_sum_s for e in parts),
            ttft_count=sum(e.ttft_count for e in parts),
            preemptions=sum(e.preemptions for e in parts)))
    return FleetDelta(engines)


ROUTER_PREFIX = "kvroute_"


def router_counters(samples: Mapping[Sample, float]) -> dict[str, float]:
    """kvroute's own counters (``kvroute_*_total``) in one scrape, summed over endpoints and
    keyed ``name{label="value",...}`` by their other labels: how a run's routing decisions
    went (eviction forecasts, KV-event gaps and drops, prefill waits, retries), not per engine."""
    counters: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if not (name.startswith(ROUTER_PREFIX) and name.endswith("_total")) or math.isnan(value):
            continue
        kept = ",".join(f'{k}="{v}"' for k, v in labels if k != "endpoint")
        key = f"{name}{{{kept}}}" if kept else name
        counters[key] = counters.get(key, 0.0) + value
    return counters


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """What each counter of ``after`` added since ``before`` (a reset reads as the after
    value); counters that did not move are left out."""
    deltas: dict[str, float] = {}
    for key, value in after.items():
        previous = before.get(key, 0.0)
        moved = value - previous if value >= previous else value
        if moved:
            deltas[key] = moved
    return deltas


def imbalance(loads: Sequence[float]) -> float:
    """Max over mean of per-engine load: 1.0 is perfectly even, N means one engine did all."""
    if not loads:
        return math.nan
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else math.nan


def engine_deltas(before: Sequence[Mapping[Sample, float]],
                  after: Sequence[Mapping[Sample, float]]) -> FleetDelta:
    """Per-engine deltas of two fleet-wide scrapes taken in the same engine order."""
    if len(before) != len(after):
        raise ValueError(f"scrapes of {len(before)} and {len(after)} engines do not match")
    return FleetDelta([delta(b, a) for b, a in zip(before, after, strict=True)])


def histogram_delta(before: Mapping[Sample, float], after: Mapping[Sample, float], name: str,
                    **labels: str) -> list[tuple[float, float]]:
    """(upper bound, observations in that bucket alone) of histogram ``name`` between two
    scrapes, ascending, summed over the label sets that carry ``labels``."""
    cumulative: dict[float, float] = {}
    for (sample, sample_labels), value in after.items():
        if sample != f"{name}_bucket":
            continue
        found = dict(sample_labels)
        if any(found.get(k) != v for k, v in labels.items()):
            continue
        bound = float(found["le"])
        earlier = before.get((sample, sample_labels), 0.0)
        cumulative[bound] = cumulative.get(bound, 0.0) + value - earlier
    buckets, below = [], 0.0
    for bound in sorted(cumulative):
        buckets.append((bound, cumulative[bound] - below))
        below = cumulative[bound]
    return buckets


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding the ``q``-th percentile (an upper estimate;
    NaN without observations, inf past the last finite bound)."""
    count = sum(n for _, n in buckets)
    if count <= 0:
        return math.nan
    rank, seen = q / 100.0 * count, 0.0
    for bound, n in buckets:
        seen += n
        if seen >= rank and n > 0:
            return bound
    return buckets[-1][0]


def count_above(buckets: Sequence[tuple[float, float]], bound: float) -> float:
    """Observations in buckets whose lower bound is at least ``bound``."""
    total_n, lower = 0.0, -math.inf
    for upper, n in buckets:
        if lower >= bound:
            total_n += n
        lower = upper
    return total_n

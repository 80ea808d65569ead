"""Per-request results and their summary: latency percentiles, throughput, errors.

Percentiles use linear interpolation between closest ranks (numpy's default), over the
successful requests of the measured window only; failed requests are counted, not timed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class RequestResult:
    """What the client saw for one request."""

    index: int
    sent_s: float  # monotonic clock
    first_token_s: float | None = None
    done_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token_s is not None and self.done_s is not None

    @property
    def ttft_s(self) -> float:
        return (self.first_token_s - self.sent_s) if self.first_token_s is not None else math.nan

    @property
    def e2e_s(self) -> float:
        return (self.done_s - self.sent_s) if self.done_s is not None else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``; NaN when empty."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan
    return float(np.percentile(np.asarray(clean, dtype=float), q))


@dataclass
class LatencySummary:
    """The client-side numbers of one contender's measured window."""

    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    requests_per_s: float
    window_s: float


def summarize(results: Sequence[RequestResult]) -> LatencySummary:
    """Percentiles and throughput; the window runs from the first send to the last finish."""
    return summarize_rounds([results])


def _window(results: Sequence[RequestResult]) -> float:
    if not results:
        return 0.0
    start = min(r.sent_s for r in results)
    end = max([r.done_s for r in results if r.ok and r.done_s is not None] + [start])
    return end - start


def summarize_rounds(rounds: Sequence[Sequence[RequestResult]]) -> LatencySummary:
    """Several measured windows of one contender (repeats): percentiles over the pooled
    requests; throughput = everything finished / the sum of the windows."""
    results = [r for round_ in rounds for r in round_]
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    e2e = [r.e2e_s for r in ok]
    window = sum(_window(round_) for round_ in rounds)
    tokens = sum(r.output_tokens for r in ok)
    return LatencySummary(
        requests=len(results), errors=len(results) - len(ok),
        ttft_p50_s=percentile(ttft, 50), ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        ttft_mean_s=float(np.mean(ttft)) if ttft else math.nan,
        e2e_p50_s=percentile(e2e, 50), e2e_p99_s=percentile(e2e, 99),
        output_tokens_per_s=tokens / window if window > 0 else math.nan,
        requests_per_s=len(ok) / window if window > 0 else math.nan,
        window_s=window)

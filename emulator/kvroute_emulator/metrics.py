"""An emulated engine's ``/metrics`` page: vLLM's series, names, labels and bucket bounds.

The series a router or autoscaler reads are emitted exactly as vLLM 0.32 does (``engine`` and
``model_name`` labels, ``_total`` counters, the same histogram buckets, ``cache_config_info``
with vLLM's label set). vLLM's many other series (speculative decoding, multi-modal cache,
FLOPs estimates, …) are left out: nothing here depends on them. Which series are promised is
:data:`SERIES`; the fidelity tests compare them with a real engine's page.

Like vLLM 0.32, the page is also served at ``/metrics/`` (vLLM's mounted ``prometheus_client``
app), where ``name[]`` query parameters restrict it to the samples of those names (the HELP and
TYPE lines of their families kept): :func:`restrict`. Plain ``/metrics`` ignores them, as
vLLM's does (a route of its HTTP instrumentation answers it first).
"""

from __future__ import annotations

from kvroute_emulator.engine import EmulatedEngine, Histogram

# name -> (type, help) for every series the page carries.
SERIES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": ("gauge", "Number of requests in model execution batches."),
    "vllm:num_requests_waiting": ("gauge", "Number of requests waiting to be processed."),
    "vllm:kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "vllm:prefix_cache_queries_total": (
        "counter", "Prefix cache queries, in terms of number of queried tokens."),
    "vllm:prefix_cache_hits_total": (
        "counter", "Prefix cache hits, in terms of number of cached tokens."),
    "vllm:num_preemptions_total": ("counter", "Cumulative number of preemption from the engine."),
    "vllm:prompt_tokens_total": ("counter", "Number of prefill tokens processed."),
    "vllm:generation_tokens_total": ("counter", "Number of generation tokens processed."),
    "vllm:request_success_total": ("counter", "Count of successfully processed requests."),
    "vllm:time_to_first_token_seconds": ("histogram", "Histogram of time to first token in "
                                                      "seconds."),
    "vllm:e2e_request_latency_seconds": ("histogram", "Histogram of e2e request latency in "
                                                      "seconds."),
    "vllm:request_queue_time_seconds": ("histogram", "Histogram of time spent in WAITING "
                                                     "phase for request."),
    "vllm:cache_config_info": ("gauge", "Information of the LLMCache config"),
}
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


def _fmt(value: float) -> str:
    return repr(float(value))


def _labels(pairs: dict[str, str]) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items()))
    return "{" + body + "}"


def cache_config_labels(engine: EmulatedEngine) -> dict[str, str]:
    """``vllm:cache_config_info``'s labels: the values that describe the emulated cache, vLLM
    0.32's defaults for the rest (so label sets match a real page)."""
    p = engine.profile
    tokens = p.kv_blocks * p.block_size
    return {
        "_block_size_resolved": "True", "block_size": str(p.block_size), "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None", "effective_attention_block_size": str(p.block_size),
        "enable_mamba_shared_prefix_checkpoint": "False", "enable_prefix_caching": "True",
        "engine": "0", "gpu_memory_utilization": "0.92", "hash_block_size": "None",
        "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": _fmt(tokens / max(1, engine.model.max_model_len)),
        "kv_cache_memory_bytes": "None", "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native", "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False", "mamba_block_size": "None",
        "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "float32",
        "num_cpu_blocks": "None", "num_gpu_blocks": str(p.kv_blocks),
        "num_gpu_blocks_override": "None", "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": "sha256_cbor", "prefix_match_unit": "None",
        "replayssm_buffer_len": "16", "skip_page_size_padded": "None", "sliding_window": "None",
        "swa_bounded_replay": "True", "use_kda_recoverssm": "False", "use_replayssm": "False",
        "user_specified_block_size": "True",
    }


def _histogram(lines: list[str], name: str, base: dict[str, str], hist: Histogram) -> None:
    cumulative = 0
    for bound, count in zip(hist.bounds, hist.counts, strict=True):
        cumulative += count
        lines.append(f"{name}_bucket{_labels({**base, 'le': _fmt(bound)})} {_fmt(cumulative)}")
    lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {_fmt(hist.count)}")
    lines.append(f"{name}_count{_labels(base)} {_fmt(hist.count)}")
    lines.append(f"{name}_sum{_labels(base)} {_fmt(hist.total)}")


def restrict(page: str, names: frozenset[str]) -> str:
    """``page`` with only the samples named in ``names``, and the ``# HELP`` / ``# TYPE`` lines
    of the families that keep a sample (``prometheus_client``'s restricted registry: a
    histogram is asked for by its ``_bucket`` / ``_count`` / ``_sum`` sample names)."""
    out: list[str] = []
    comments: list[str] = []
    for line in page.splitlines():
        if line.startswith("#"):
            if line.startswith("# HELP "):
                comments = []
            comments.append(line)
            continue
        end = min((i for i in (line.find("{"), line.find(" ")) if i != -1), default=len(line))
        if line[:end] in names:
            out += comments
            comments = []
            out.append(line)
    return "\n".join(out) + "\n" if out else ""


def _sample_names(name: str, kind: str) -> frozenset[str]:
    if kind == "histogram":
        return frozenset((f"{name}_bucket", f"{name}_count", f"{name}_sum"))
    return frozenset((name,))


def render(engine: EmulatedEngine, names: frozenset[str] | None = None) -> str:
    """The page's text (Prometheus text format 0.0.4); with ``names``, only the families that
    have a sample of those names (the caller then applies :func:`restrict` to the samples): a router
    asks for its few series every 100 ms, and one emulator process answers for the fleet."""
    sim, stats = engine.sim, engine.stats
    base = {"engine": "0", "model_name": engine.model.name}
    used = (sim.pinned + sim.reserved) / sim.profile.kv_blocks if sim.profile.kv_blocks else 0.0
    values: dict[str, float] = {
        "vllm:num_requests_running": float(len(sim.running)),
        "vllm:num_requests_waiting": float(len(sim.waiting)),
        "vllm:kv_cache_usage_perc": used,
        "vllm:prefix_cache_queries_total": float(sim.prefix_queries),
        "vllm:prefix_cache_hits_total": float(sim.prefix_hits),
        "vllm:num_preemptions_total": float(sim.preemptions),
        "vllm:prompt_tokens_total": float(stats.prompt_tokens),
        "vllm:generation_tokens_total": float(stats.generation_tokens),
    }
    histograms = {"vllm:time_to_first_token_seconds": stats.ttft,
                  "vllm:e2e_request_latency_seconds": stats.e2e,
                  "vllm:request_queue_time_seconds": stats.queue}
    lines: list[str] = []
    for name, (kind, help_text) in SERIES.items():
        if names is not None and names.isdisjoint(_sample_names(name, kind)):
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        if name in values:
            lines.append(f"{name}{_labels(base)} {_fmt(values[name])}")
        elif name == "vllm:request_success_total":
            for reason in FINISHED_REASONS:
                count = stats.success.get(reason, 0)
                lines.append(f"{name}{_labels({**base, 'finished_reason': reason})} "
                             f"{_fmt(count)}")
        elif name in histograms:
            _histogram(lines, name, base, histograms[name])
        elif name == "vllm:cache_config_info":
            lines.append(f"{name}{_labels(cache_config_labels(engine))} 1.0")
    return "\n".join(lines) + "\n"

"""A fast parser of the few series the router needs from vLLM's ``/metrics`` text.

vLLM exposes hundreds of lines (histogram buckets mostly); the full ``prometheus_client``
parser builds objects for all of them. This parser looks only at lines whose metric name is
wanted, sums gauges and counters over label sets (data-parallel ranks report one series each)
and reads the label-only info series (``vllm:cache_config_info``, ``vllm:lora_requests_info``).
``tests/unit/router/test_vllm_metrics.py`` checks it against ``prometheus_client``'s parser.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

from kvroute_router.framework.endpoint import EndpointMetrics

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_LEGACY = "vllm:gpu_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
CACHE_CONFIG = "vllm:cache_config_info"
LORA_INFO = "vllm:lora_requests_info"

SUMMED = {RUNNING, WAITING, PREFIX_QUERIES, PREFIX_HITS}
MAXED = {KV_USAGE, KV_USAGE_LEGACY}
INFO = {CACHE_CONFIG, LORA_INFO}
WANTED = SUMMED | MAXED | INFO



class MetricsParseError(ValueError):
    """A wanted series has a value that is not a finite number: the page cannot be trusted."""


_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_labels(text: str) -> dict[str, str]:
    return {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            for k, v in _LABEL.findall(text)}


@functools.lru_cache(maxsize=1024)
def _info_labels(text: str) -> Mapping[str, str]:
    """:func:`parse_labels` of an info series, remembered: ``cache_config_info`` carries ~40
    labels that never change, and decoding them was ~60 % of parsing a page (one page per
    endpoint every 100 ms). The result is shared: read it, never change it."""
    return parse_labels(text)


def _int_label(labels: Mapping[str, str], name: str) -> int | None:
    try:
        return int(float(labels[name]))
    except (KeyError, ValueError, OverflowError):  # absent, not a number, or infinite
        return None


def _adapters(labels: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(a for a in labels.get(name, "").split(",") if a)


_WANTED_LINE = re.compile(
    r"\n((?:" + "|".join(re.escape(name) for name in sorted(WANTED)) + r")[{ \t][^\n]*)")
"""A line that starts with a wanted metric name (the whole name: ``{`` or a blank follows)."""


def _wanted_lines(text: str) -> list[str]:
    """The lines that start with a wanted metric name, in page order.

    One regular-expression pass, in C, from line start to line start (the pattern begins with
    a newline; the text gets one in front so that its first line counts too). A vLLM page is
    ~600 lines (~60 KB), nearly all histogram buckets, and every endpoint is scraped every
    100 ms, so this is the router's largest idle cost: a ``str.find`` per wanted name (eight
    scans of the whole page, since a name may appear anywhere) took ~3x longer."""
    return _WANTED_LINE.findall("\n" + text)


def parse_vllm_metrics(text: str, scraped_at: float) -> EndpointMetrics:
    """The router's metrics snapshot from a vLLM ``/metrics`` body; :class:`MetricsParseError`
    when a wanted series' value is not a finite number (load computed from it would be
    meaningless: the scraper drops the endpoint's snapshot instead)."""
    sums: dict[str, float] = {}
    cache_labels: Mapping[str, str] = {}
    lora_labels: Mapping[str, str] = {}
    lora_stamp = float("-inf")
    for line in _wanted_lines(text):
        brace = line.find("{")
        space = line.find(" ")
        end = brace if brace != -1 and (space == -1 or brace < space) else space
        if end == -1:
            continue
        name = line[:end]
        if name not in WANTED:
            continue
        if brace == end:
            close = line.rfind("}")
            if close == -1:
                continue  # a truncated line, not a value
            labels_text, rest = line[brace + 1:close], line[close + 1:]
        else:
            labels_text, rest = "", line[end:]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            raise MetricsParseError(f"{name} has the value {fields[0][:40]!r}") from None
        if not math.isfinite(value) and name not in INFO:
            raise MetricsParseError(f"{name} has the value {fields[0][:40]!r}")
        if name in SUMMED:
            sums[name] = sums.get(name, 0.0) + value
        elif name in MAXED:
            sums[name] = max(sums.get(name, 0.0), value)
        elif name == CACHE_CONFIG:
            cache_labels = _info_labels(labels_text)
        elif value >= lora_stamp:  # LORA_INFO: the latest sample wins
            lora_stamp = value
            lora_labels = _info_labels(labels_text)
    kv = sums.get(KV_USAGE, sums.get(KV_USAGE_LEGACY, 0.0))
    return EndpointMetrics(
        running=sums.get(RUNNING, 0.0),
        waiting=sums.get(WAITING, 0.0),
        kv_cache_usage=min(1.0, max(0.0, kv)),
        prefix_cache_queries=sums.get(PREFIX_QUERIES, 0.0),
        prefix_cache_hits=sums.get(PREFIX_HITS, 0.0),
        block_size=_int_label(cache_labels, "block_size"),
        hash_algo=cache_labels.get("prefix_caching_hash_algo"),
        num_gpu_blocks=_int_label(cache_labels, "num_gpu_blocks"),
        running_loras=_adapters(lora_labels, "running_lora_adapters"),
        waiting_loras=_adapters(lora_labels, "waiting_lora_adapters"),
        max_loras=_int_label(lora_labels, "max_lora"),
        scraped_at=scraped_at,
    )

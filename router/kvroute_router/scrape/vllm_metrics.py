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


def _int_label(labels: Mapping[str, str], name: str) -> int | None:
    try:
        return int(float(labels[name]))
    except (KeyError, ValueError, OverflowError):  # absent, not a number, or infinite
        return None


def _adapters(labels: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(a for a in labels.get(name, "").split(",") if a)


@functools.lru_cache(maxsize=256)
def _cache_config(labels_text: str) -> tuple[int | None, str | None, int | None]:
    """(block size, hash algorithm, GPU blocks) of a ``cache_config_info`` label set,
    remembered: its ~40 labels never change, and decoding them each time was most of parsing
    a page (one page per endpoint every 100 ms)."""
    labels = parse_labels(labels_text)
    return (_int_label(labels, "block_size"), labels.get("prefix_caching_hash_algo"),
            _int_label(labels, "num_gpu_blocks"))


@functools.lru_cache(maxsize=1024)
def _lora(labels_text: str) -> tuple[frozenset[str], frozenset[str], int | None]:
    """(running adapters, waiting adapters, max LoRAs) of a ``lora_requests_info`` label
    set, remembered like :func:`_cache_config`."""
    labels = parse_labels(labels_text)
    return (_adapters(labels, "running_lora_adapters"),
            _adapters(labels, "waiting_lora_adapters"), _int_label(labels, "max_lora"))


_NO_LORA: tuple[frozenset[str], frozenset[str], int | None] = (frozenset(), frozenset(), None)

_NAMES = "|".join(re.escape(name) for name in sorted(WANTED))
_WANTED_SAMPLE = re.compile(r"\n(" + _NAMES + r")(?:\{([^\n]*)\}([^\n]*)|( [^\n]*))")
"""A wanted sample, split where :func:`parse_vllm_metrics` reads it: (name, labels, what
follows the labels) when ``{`` follows the name (the labels end at the line's last ``}``), or
(name, "", "", what follows) when a blank does; a line with an unclosed ``{`` or a tab after
the name matches neither and is skipped. One pass in C over the page (the text gets a newline
in front so that its first line counts too): vLLM's whole page is ~600 lines (~60 KB), nearly
all histogram buckets, and a ``str.find`` per wanted name took ~3x longer; splitting the
samples in the same pass, instead of finding their lines and splitting each in Python, made
parsing the restricted page ~35 % cheaper (docs/benchmarks/router-cpu.md, *Round 22*)."""


def parse_vllm_metrics(text: str, scraped_at: float) -> EndpointMetrics:
    """The router's metrics snapshot from a vLLM ``/metrics`` body; :class:`MetricsParseError`
    when a wanted series' value is not a finite number (load computed from it would be
    meaningless: the scraper drops the endpoint's snapshot instead)."""
    sums: dict[str, float] = {}
    cache: tuple[int | None, str | None, int | None] = (None, None, None)
    lora = _NO_LORA
    lora_stamp = float("-inf")
    for name, labels_text, after_labels, after_name in _WANTED_SAMPLE.findall("\n" + text):
        fields = (after_labels or after_name).split()
        if not fields:
            continue  # a truncated line, not a value
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
            cache = _cache_config(labels_text)
        elif value >= lora_stamp:  # LORA_INFO: the latest sample wins
            lora_stamp = value
            lora = _lora(labels_text)
    kv = sums.get(KV_USAGE, sums.get(KV_USAGE_LEGACY, 0.0))
    return EndpointMetrics(
        running=sums.get(RUNNING, 0.0),
        waiting=sums.get(WAITING, 0.0),
        kv_cache_usage=min(1.0, max(0.0, kv)),
        prefix_cache_queries=sums.get(PREFIX_QUERIES, 0.0),
        prefix_cache_hits=sums.get(PREFIX_HITS, 0.0),
        block_size=cache[0],
        hash_algo=cache[1],
        num_gpu_blocks=cache[2],
        running_loras=lora[0],
        waiting_loras=lora[1],
        max_loras=lora[2],
        scraped_at=scraped_at,
    )

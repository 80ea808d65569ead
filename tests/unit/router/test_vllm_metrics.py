"""The fast /metrics parser agrees with prometheus_client's parser on vLLM's series."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from kvroute_router.scrape.vllm_metrics import parse_vllm_metrics
from prometheus_client.parser import text_string_to_metric_families

SAMPLE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 640.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",enable_prefix_caching="True",\
num_gpu_blocks="2048",prefix_caching_hash_algo="sha256_cbor"} 1.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 10.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="c",waiting_lora_adapters="d"} 20.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 1.0
"""


def test_fast_parser_reads_vllm_series() -> None:
    m = parse_vllm_metrics(SAMPLE, scraped_at=12.5)
    assert (m.running, m.waiting) == (5.0, 5.0)
    assert m.kv_cache_usage == 0.5
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (1000.0, 640.0)
    assert (m.block_size, m.num_gpu_blocks, m.hash_algo) == (32, 2048, "sha256_cbor")
    assert m.running_loras == {"c"} and m.waiting_loras == {"d"} and m.max_loras == 2
    assert m.scraped_at == 12.5


def test_fast_parser_matches_prometheus_client() -> None:
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(SAMPLE):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    m = parse_vllm_metrics(SAMPLE, scraped_at=0)
    assert m.running == sums["vllm:num_requests_running"]
    assert m.waiting == sums["vllm:num_requests_waiting"]
    assert m.prefix_cache_hits == sums["vllm:prefix_cache_hits_total"]


def test_garbage_and_empty_text_give_zero_snapshot() -> None:
    m = parse_vllm_metrics("not metrics\nvllm:num_requests_running{broken\n", scraped_at=1)
    assert m.running == 0 and m.block_size is None


def test_only_whole_wanted_names_count_wherever_the_line_is() -> None:
    from kvroute_router.scrape.vllm_metrics import parse_vllm_metrics

    text = ('vllm:num_requests_running{engine="0"} 2\n'  # first line: no newline before it
            'vllm:num_requests_running_total{engine="0"} 50\n'  # a longer name: not ours
            'vllm:num_requests_waitingx 9\n'
            '# HELP vllm:num_requests_waiting waiting\n'
            'vllm:num_requests_running{engine="1"} 3\n'
            'vllm:num_requests_waiting{engine="0"} 4')  # last line: no newline after it
    m = parse_vllm_metrics(text, 1.0)
    assert (m.running, m.waiting) == (5.0, 4.0)


def _naive_parse(text: str) -> tuple[float | str, ...] | str:
    """The reference: walk every line; a sample is a wanted name then ``{labels}`` (to the
    line's last ``}``) or a blank, then its value; summed, maxed or read as labels like the
    parser. The error's text when a wanted value is not a finite number."""
    import math

    from kvroute_router.scrape.vllm_metrics import INFO, MAXED, WANTED, parse_labels

    sums: dict[str, float] = {}
    cache: dict[str, str] = {}
    lora: dict[str, str] = {}
    stamp = -math.inf
    for line in text.split("\n"):
        name = next((n for n in WANTED if line.startswith(n)
                     and line[len(n):len(n) + 1] in ("{", " ")), None)
        if name is None:
            continue
        if line[len(name)] == "{":
            close = line.rfind("}")
            if close == -1:
                continue
            labels, rest = line[len(name) + 1:close], line[close + 1:]
        else:
            labels, rest = "", line[len(name):]
        if not rest.split():
            continue
        try:
            value = float(rest.split()[0])
        except ValueError:
            return "bad value"
        if not math.isfinite(value) and name not in INFO:
            return "bad value"
        if name in MAXED:
            sums[name] = max(sums.get(name, 0.0), value)
        elif name == "vllm:cache_config_info":
            cache = parse_labels(labels)
        elif name == "vllm:lora_requests_info":
            if value >= stamp:
                stamp, lora = value, parse_labels(labels)
        else:
            sums[name] = sums.get(name, 0.0) + value
    kv = sums.get("vllm:kv_cache_usage_perc", sums.get("vllm:gpu_cache_usage_perc", 0.0))
    return (sums.get("vllm:num_requests_running", 0.0), sums.get("vllm:num_requests_waiting", 0.0),
            min(1.0, max(0.0, kv)), sums.get("vllm:prefix_cache_queries_total", 0.0),
            sums.get("vllm:prefix_cache_hits_total", 0.0), cache.get("block_size", ""),
            cache.get("prefix_caching_hash_algo", ""), lora.get("running_lora_adapters", ""),
            lora.get("max_lora", ""))


_NAMES = ["vllm:num_requests_running", "vllm:num_requests_running_total",
          "vllm:num_requests_waiting", "vllm:num_requests_waiting_by_reason",
          "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:cache_config_info",
          "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
          "vllm:lora_requests_info", "vllm:e2e_request_latency_seconds_bucket", "vllm:",
          "# HELP vllm:num_requests_running", "xvllm:num_requests_running", ""]


@given(st.lists(st.tuples(st.sampled_from(_NAMES),
                          st.sampled_from(["{", " ", "\t", "", "x", "_", "\r"]),
                          st.sampled_from(['engine="0"} 1.0', "2", "", "} 3\r", "{a=\"\n\"} 4",
                                           'block_size="32",max_lora="2",'
                                           'running_lora_adapters="a,b"} 5 17',
                                           "} nan", "} +Inf", "1e3 12", "} x", "{} 2} 7"])),
                max_size=12),
       st.booleans())
def test_the_parser_reads_what_a_plain_walk_over_the_lines_reads(
        lines: list[tuple[str, str, str]], trailing_newline: bool) -> None:
    # The one-pass parser against a plain walk over every line, on pages with longer names,
    # prefixes, comments, blank and carriage-return lines, tabs, unclosed and nested braces,
    # timestamps and bad values, anywhere on the page.
    from kvroute_router.scrape.vllm_metrics import MetricsParseError

    text = "\n".join(name + sep + rest for name, sep, rest in lines)
    text += "\n" if trailing_newline else ""
    expected = _naive_parse(text)
    try:
        m = parse_vllm_metrics(text, 0.0)
    except MetricsParseError:
        assert expected == "bad value"
        return
    assert expected == (m.running, m.waiting, m.kv_cache_usage, m.prefix_cache_queries,
                        m.prefix_cache_hits, "" if m.block_size is None else str(m.block_size),
                        m.hash_algo or "", ",".join(sorted(m.running_loras)),
                        "" if m.max_loras is None else str(m.max_loras))

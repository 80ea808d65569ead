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


def _naive_wanted_lines(text: str) -> list[str]:
    """The reference: walk every line, keep those whose first token is a wanted name."""
    from kvroute_router.scrape.vllm_metrics import WANTED

    return [line for line in text.split("\n")
            if any(line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ", "\t")
                   for name in WANTED)]


_NAMES = ["vllm:num_requests_running", "vllm:num_requests_running_total",
          "vllm:num_requests_waiting", "vllm:num_requests_waiting_by_reason",
          "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:cache_config_info",
          "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
          "vllm:lora_requests_info", "vllm:e2e_request_latency_seconds_bucket", "vllm:",
          "# HELP vllm:num_requests_running", "xvllm:num_requests_running", ""]


@given(st.lists(st.tuples(st.sampled_from(_NAMES),
                          st.sampled_from(["{", " ", "\t", "", "x", "_", "\r"]),
                          st.sampled_from(['engine="0"} 1.0', "2", "", "} 3\r", "{a=\"\n\"} 4"])),
                max_size=12),
       st.booleans())
def test_wanted_lines_are_every_line_that_starts_with_a_wanted_name(
        lines: list[tuple[str, str, str]], trailing_newline: bool) -> None:
    # The fast finder (one regex pass) against a plain walk over every line, on pages with
    # longer names, prefixes, comments, blank and carriage-return lines, anywhere on the page.
    from kvroute_router.scrape.vllm_metrics import _wanted_lines

    text = "\n".join(name + sep + rest for name, sep, rest in lines)
    text += "\n" if trailing_newline else ""
    assert _wanted_lines(text) == _naive_wanted_lines(text)

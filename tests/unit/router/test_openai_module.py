"""The typed OpenAI layer: hostile bodies are client faults naming the field, usage is read as
JSON, bounds are normalised the way vLLM reads the body."""

from __future__ import annotations

import json

import pytest
from kvroute_router.framework.request import LLMRequest
from kvroute_router.openai.errors import BadRequestError
from kvroute_router.openai.requests import (
    IMAGE_TOKENS,
    MAX_DEPTH,
    ChatRequest,
    decode_body,
    endpoint_kind,
    parse_body,
    parse_request,
)
from kvroute_router.openai.usage import usage_of

DEEP = 100_000

# (raw body, endpoint, the param the 400 must name)
HOSTILE: list[tuple[bytes, str, str | None]] = [
    (b'{"model": "chat", "prompt": "x", "tools": ' + b"[" * DEEP + b"]" * DEEP + b"}",
     "completions", "tools"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "metadata": '
     + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}", "chat", "metadata"),
    (b"[" * DEEP + b"]" * DEEP, "completions", None),
    (b'{"model": "chat", "prompt": "caf\xe9 \xff"}', "completions", "prompt"),
    (b'{"model": "chat", "prompt": "x", "max_tokens": 1e400}', "completions", "max_tokens"),
    (b'{"model": "chat", "prompt": "x", "max_tokens": 1000000000000000000000000000000}',
     "completions", "max_tokens"),
    (b'{"model": "chat", "prompt": "x", "max_tokens": NaN}', "completions", "max_tokens"),
    (b'{"model": "chat", "prompt": "x", "max_tokens": 1.5}', "completions", "max_tokens"),
    (b'{"model": "chat", "prompt": "x", "n": "3"}', "completions", "n"),
    (b'{"model": "chat", "prompt": "x", "best_of": 1e30}', "completions", "best_of"),
    (b'{"model": "chat", "prompt": [[1, 2], "x", [3, "y"]]}', "completions", "prompt"),
    (b'{"model": "chat", "messages": [1]}', "chat", "messages"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": [1]}]}', "chat", "messages"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "tools": "all"}',
     "chat", "tools"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], '
     b'"max_completion_tokens": -1}', "chat", "max_completion_tokens"),
    (b'{"model": 7, "prompt": "x"}', "completions", "model"),
]


@pytest.mark.parametrize(("raw", "kind", "param"), HOSTILE,
                         ids=[f"{k}-{p}-{i}" for i, (_, k, p) in enumerate(HOSTILE)])
def test_hostile_bodies_are_bad_requests_naming_the_field(raw: bytes, kind: str,
                                                          param: str | None) -> None:
    with pytest.raises(BadRequestError) as err:
        parse_body(raw, "chat" if kind == "chat" else "completions")
    assert err.value.param == param


def test_nesting_up_to_the_limit_is_accepted() -> None:
    def nested(levels: int) -> object:
        value: object = "s"
        for _ in range(levels):
            value = [value]
        return value

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "x": nested(MAX_DEPTH - 1)}
    assert isinstance(parse_body(json.dumps(body).encode(), "chat"), ChatRequest)
    with pytest.raises(BadRequestError) as err:
        decode_body(json.dumps({**body, "x": nested(MAX_DEPTH)}).encode())
    assert err.value.param == "x"


# vLLM 0.32's usage objects, as its OpenAI server writes them (prompt_tokens_details appears
# with --enable-prompt-tokens-details, or always in newer versions).
VLLM_USAGE = ('{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3,'
              '"prompt_tokens_details":{"cached_tokens":0}}')


# Serialised by vLLM 0.32's own protocol classes (CompletionStreamResponse / CompletionResponse
# with UsageInfo + PromptTokenUsageInfo, dumped the way its serving code dumps them).
VLLM_STREAM_END = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"kvroute-test-model",'
    b'"choices":[],"usage":{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3,'
    b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":'
    b'{"reasoning_tokens":0}}}\n\ndata: [DONE]\n\n')
VLLM_ANSWER = (
    b'{"id":"cmpl-2","object":"text_completion","created":1,"model":"kvroute-test-model",'
    b'"choices":[{"index":0,"text":"} \\"usage\\": {","logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null,'
    b'"routed_experts":null}],"service_tier":null,"system_fingerprint":null,"usage":'
    b'{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3,"prompt_tokens_details":'
    b'{"cached_tokens":0,"created_cache_tokens":null,"multimodal_tokens":null},'
    b'"completion_tokens_details":{"reasoning_tokens":0}},"kv_transfer_params":null,'
    b'"ec_transfer_params":null,"metrics":null}')


def test_usage_of_vllm_serialised_answers() -> None:
    assert usage_of(VLLM_STREAM_END) == (7, 3)
    assert usage_of(VLLM_ANSWER) == (7, 3)
    assert json.loads(VLLM_ANSWER)["usage"]["prompt_tokens"] == 7  # the golden is valid JSON


def test_usage_with_nested_details_is_read_from_a_stream_and_a_whole_answer() -> None:
    stream = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
              b'"choices":[{"index":0,"text":" x","logprobs":null,"finish_reason":null}]}\n\n'
              b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
              b'"choices":[],"usage":' + VLLM_USAGE.encode() + b'}\n\ndata: [DONE]\n\n')
    assert usage_of(stream) == (7, 3)
    answer = json.dumps({"id": "cmpl-2", "object": "text_completion", "model": "m",
                         "choices": [{"index": 0, "text": "} \"usage\" {", "finish_reason":
                                      "length"}],
                         "usage": json.loads(VLLM_USAGE), "kv_transfer_params": None})
    assert usage_of(answer.encode()) == (7, 3)
    cut = answer.encode()
    assert usage_of(cut[cut.rfind(b'"usage"') - 3:]) == (7, 3)  # only the tail was kept
    assert usage_of(b'{"choices": [], "usage": null}') == (None, None)
    assert usage_of(b'{"usage": {"prompt_tokens": 7, "completion_to') == (None, None)


def test_output_bound_is_the_field_the_engine_reads() -> None:
    both = {"model": "m", "max_completion_tokens": 1, "max_tokens": 100000}
    completions = parse_request({**both, "prompt": "x"}, "completions")
    assert (completions.output_bound, completions.output_param) == (100000, "max_tokens")
    chat = parse_request({**both, "messages": [{"role": "user", "content": "x"}]}, "chat")
    assert (chat.output_bound, chat.output_param) == (1, "max_completion_tokens")
    chat = parse_request({"model": "m", "max_completion_tokens": None, "max_tokens": 9,
                          "messages": [{"role": "user", "content": "x"}]}, "chat")
    assert chat.output_bound == 9
    null = parse_request({"model": "m", "prompt": "x", "max_tokens": None}, "completions")
    assert null.output_bound is None
    assert parse_request({"model": "m", "prompt": "x", "n": 3, "best_of": 5},
                         "completions").sequences == 5


def test_prompt_bound_covers_every_prompt_tools_and_images() -> None:
    batch = parse_request({"model": "m", "prompt": ["a", "b" * 1000, "c" * 5000]},
                          "completions")
    assert batch.prompt_tokens_bound >= 6001
    ids = parse_request({"model": "m", "prompt": [[1, 2, 3], [4] * 100]}, "completions")
    assert ids.prompt_tokens_bound == 103
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 1000,
                                                "parameters": {"type": "object"}}}
             for i in range(200)]
    size = len(json.dumps(tools, separators=(",", ":")))
    assert size > 200_000
    chat = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                          "tools": tools}, "chat")
    assert chat.prompt_tokens_bound >= size
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10}}
    vision = parse_request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, image, image]}]}, "chat")
    assert vision.prompt_tokens_bound >= 2 * IMAGE_TOKENS
    request = LLMRequest.from_openai(batch, {})
    assert request.prompt_text == "a"  # routed by its first prompt
    assert request.prompt_upper_bound() == batch.prompt_tokens_bound


def test_paths_are_classified() -> None:
    assert endpoint_kind("/v1/chat/completions?x=1") == "chat"
    assert endpoint_kind("/v1/completions") == "completions"
    assert endpoint_kind("/v1/embeddings") == "other"


# -- the usage event the proxy asks for on the client's behalf ------------------------------
def test_streams_without_usage_ask_the_engine_and_the_client_never_sees_the_event() -> None:
    from kvroute_router.openai.upstream import upstream_changes, usage_injected
    from kvroute_router.openai.usage import UsageEventFilter, usage_of

    body = {"model": "m", "prompt": "x", "stream": True}
    assert usage_injected(body)
    assert upstream_changes(body, "completions", "m", None, request_usage=True) == {
        "stream_options": {"include_usage": True}}
    assert upstream_changes(body, "completions", "m", None) == {}  # ext_proc: unchanged
    asked = {**body, "stream_options": {"include_usage": True}}
    assert not usage_injected(asked) and not usage_injected({"model": "m", "prompt": "x"})

    events = (b'data: {"choices":[{"text":"a"}]}\n\n'
              b'data: {"choices":[{"text":"bc"}]}\n\n'
              b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,'
              b'"completion_tokens":5,"prompt_tokens_details":null}}\n\n'
              b"data: [DONE]\n\n")
    for size in (1, 7, 40, len(events)):  # any chunking
        relay = UsageEventFilter()
        out = b"".join(relay.feed(events[i:i + size]) for i in range(0, len(events), size))
        out += relay.flush()
        assert out == (b'data: {"choices":[{"text":"a"}]}\n\n'
                       b'data: {"choices":[{"text":"bc"}]}\n\ndata: [DONE]\n\n'), size
    assert usage_of(events) == (3, 5)  # the router still reads it from the raw stream

"""Cache keys (what must match) and answers (what is recorded and how it is replayed)."""

from __future__ import annotations

import json

from kvroute_router.responsecache.answer import AnswerRecorder, render_json, render_sse
from kvroute_router.responsecache.key import cache_key, cacheability


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": text}],
            "temperature": 0, **extra}


def test_exact_key_ignores_form_and_surrounding_whitespace() -> None:
    a = cache_key(chat("What is 2+2?"), "chat", "m", "ns/p")
    b = cache_key(chat("  What is 2+2?\n", stream=True, stream_options={"include_usage": True},
                       user="u1"), "chat", "m", "ns/p")
    assert a == b
    assert a.text == "What is 2+2?"


def test_key_separates_sampling_tools_scope_and_context() -> None:
    base = cache_key(chat("What is 2+2?"), "chat", "m", "ns/p")
    for other in (cache_key(chat("What is 2+2?", max_tokens=5), "chat", "m", "ns/p"),
                  cache_key(chat("What is 2+2?", tools=[{"type": "function", "function": {
                      "name": "f"}}]), "chat", "m", "ns/p"),
                  cache_key(chat("What is 2+2?"), "chat", "m", "ns/p\x00tenant-b"),
                  cache_key(chat("What is 2+2?"), "chat", "other", "ns/p")):
        assert other.exact != base.exact and other.partition != base.partition
    paraphrase = cache_key(chat("How much is two plus two?"), "chat", "m", "ns/p")
    assert paraphrase.exact != base.exact and paraphrase.partition == base.partition
    other_system = dict(chat("What is 2+2?"))
    other_system["messages"] = [{"role": "system", "content": "Be verbose."},
                                {"role": "user", "content": "What is 2+2?"}]
    assert cache_key(other_system, "chat", "m", "ns/p").partition != base.partition


def test_sampling_requests_skip_unless_allowed() -> None:
    assert cacheability({"temperature": 0}, False) is None
    assert cacheability({"temperature": 0.7}, False) == "sampling"
    assert cacheability({}, False) == "sampling"  # engines sample by default
    assert cacheability({"temperature": 0.7}, True) is None


def sse(events: list[dict[str, object]], done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


STREAM = [
    {"id": "x", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"id": "x", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"content": "Four"}, "finish_reason": None}]},
    {"id": "x", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}]},
    {"id": "x", "created": 1, "model": "m", "choices": [],
     "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
]


def test_stream_is_assembled_split_anywhere_and_replayed_in_both_forms() -> None:
    raw = sse(STREAM)
    recorder = AnswerRecorder("chat", stream=True)
    for i in range(0, len(raw), 7):  # chunk boundaries inside events
        recorder.feed(raw[i:i + 7])
    answer = recorder.answer(200)
    assert answer is not None
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Four."}
    assert answer["usage"]["completion_tokens"] == 2

    body = json.loads(render_json(answer, "chat", "alias"))
    assert body["model"] == "alias" and body["choices"][0]["message"]["content"] == "Four."

    replay = render_sse(answer, "chat", "alias", include_usage=True).decode()
    events = [line[6:] for line in replay.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Four."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 11
    no_usage_option = render_sse(answer, "chat", "alias", include_usage=False).decode()
    last = json.loads([e for e in no_usage_option.split("\n") if e.startswith("data: {")][-1][6:])
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["total_tokens"] == 11


def test_cut_streams_errors_and_unfinished_choices_are_not_recorded() -> None:
    for raw, status in ((sse(STREAM, done=False), 200),   # cut before [DONE]
                        (sse(STREAM), 502),                # the proxy saw the stream break
                        (sse(STREAM[:2]), 200),            # no finish_reason
                        (b'{"error": {"message": "x"}}', 200),
                        (b'{"object": "error", "message": "bad"}', 400)):
        recorder = AnswerRecorder("chat", stream=True)
        recorder.feed(raw)
        assert recorder.answer(status) is None


def test_completions_stream_and_json() -> None:
    events = [{"id": "c", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
              {"id": "c", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": "lo", "finish_reason": "length"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}]
    recorder = AnswerRecorder("completions", stream=True)
    recorder.feed(sse(events))
    answer = recorder.answer(200)
    assert answer is not None and answer["choices"][0]["text"] == "Hello"
    recorder = AnswerRecorder("completions", stream=False)
    recorder.feed(render_json(answer, "completions", "m"))
    again = recorder.answer(200)
    assert again is not None and again["choices"][0]["text"] == "Hello"


def test_streamed_tool_calls_are_assembled_and_malformed_ones_are_not_recorded() -> None:
    def event(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
        return {"id": "t", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    calls = [event({"role": "assistant"}),
             event({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                                    "function": {"name": "f", "arguments": "{\"x\""}},
                                   {"index": 1, "id": "b", "type": "function",
                                    "function": {"name": "g", "arguments": ""}}]}),
             event({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}},
                                   {"index": 1, "function": {"arguments": "{}"}}]}),
             event({}, "tool_calls")]
    recorder = AnswerRecorder("chat", stream=True)
    recorder.feed(sse(calls))
    answer = recorder.answer(200)
    assert answer is not None
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    # Replayed as a stream and recorded again: the same answer.
    again = AnswerRecorder("chat", stream=True)
    again.feed(render_sse(answer, "chat", "m", include_usage=False))
    replayed = again.answer(200)
    assert replayed is not None and replayed["choices"] == answer["choices"]
    bads: list[object] = [[{"id": "no-index"}], [{"index": 0, "function": {"arguments": 5}}],
                          "x"]
    for bad in bads:
        recorder = AnswerRecorder("chat", stream=True)
        recorder.feed(sse([calls[0], event({"tool_calls": bad}), calls[-1]]))
        assert recorder.answer(200) is None

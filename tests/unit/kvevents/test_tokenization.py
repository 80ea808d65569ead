"""In-process tokenisation against transformers' own ``apply_chat_template`` (what vLLM calls)
on the test model's tokenizer files; the e2e tests compare with the engine's ``/tokenize``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kvroute_cli.testmodel import build_test_model
from kvroute_router.kvevents.tokenization import PromptTokenizer

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "héllo"},
                                 {"type": "text", "text": "world"}]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("model"))


def test_chat_matches_transformers(model_dir: Path) -> None:
    import transformers
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    ours = PromptTokenizer.from_directory(model_dir)
    joined = [dict(m, content="héllo\nworld") if m["role"] == "user" else m for m in MESSAGES]
    for add_generation_prompt in (True, False):
        text = reference.apply_chat_template(joined, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        assert ours.render_chat(MESSAGES, add_generation_prompt=add_generation_prompt) == text
        body = {"messages": MESSAGES, "add_generation_prompt": add_generation_prompt}
        assert ours.tokenize("chat", body) == reference.encode(text, add_special_tokens=False)


def test_completions_token_ids_and_cache(model_dir: Path) -> None:
    ours = PromptTokenizer.from_directory(model_dir, cache_tokens=64)
    assert ours.tokenize("completions", {"prompt": "abc"}) == [ord("a"), ord("b"), ord("c")]
    assert ours.tokenize("completions", {"prompt": "abc"}) == [ord("a"), ord("b"), ord("c")]
    assert ours.hits == 1
    assert ours.tokenize("completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert ours.tokenize("completions", None, token_ids=[1, 2]) == [1, 2]
    ours.tokenize("completions", {"prompt": "x" * 100})  # larger than the cache: not kept
    assert ours.tokenize("chat", {"messages": MESSAGES, "continue_final_message": True}) is None


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_fast_encoding_gives_the_same_ids_as_encode(model_dir: Path,
                                                    add_special_tokens: bool) -> None:
    tokenizer = PromptTokenizer.from_directory(model_dir)
    texts = ["", "hello", " leading space", "<s>special</s> inside", "ünïcode ✓ 中文",
             "x" * 5000, "line\nbreaks\ttabs"]
    for text in texts:
        expected = tokenizer.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        assert tokenizer.encode_uncached(text, add_special_tokens) == expected
        assert tokenizer.encode(text, add_special_tokens) == expected


def test_the_cache_keeps_4_bytes_per_token_whatever_the_vocabulary(model_dir: Path) -> None:
    """The cache's bound is in tokens (4M by default); as Python ints a real vocabulary's ids
    cost ~40 bytes each (an int object per id above 256: ~160 MB per pool at the bound), which
    the soak benchmark saw as steady RSS growth. Stored as ``array('I')``: ~4 bytes."""
    import random
    import tracemalloc

    tokenizer = PromptTokenizer.from_directory(model_dir, cache_tokens=10**9)
    rng = random.Random(0)
    prompts = 200
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(prompts):
            ids = [rng.randrange(1000, 128_000) for _ in range(1000)]
            tokenizer._remember(i.to_bytes(16, "big"), ids)
            del ids
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tokenizer.cache_size() == (prompts, prompts * 1000)
    assert used / (prompts * 1000) < 6  # bytes per cached token (was ~40)
    # What comes back is what went in, as a fresh list.
    tokenizer._remember(b"k" * 16, [5, 70_000, 2**32 - 1])
    assert tokenizer._cached(b"k" * 16) == [5, 70_000, 2**32 - 1]
    tokenizer._remember(b"x" * 16, [-1])  # not a token id: not cached, no error
    assert tokenizer._cached(b"x" * 16) is None

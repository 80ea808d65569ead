"""In-process tokenisation against transformers' own ``apply_chat_template`` (what vLLM calls)
on the test model's tokenizer files; the e2e tests compare with the engine's ``/tokenize``."""

from __future__ import annotations

import itertools
from array import array
from pathlib import Path
from typing import Any

import pytest
from kvroute_cli.testmodel import build_test_model
from kvroute_router.kvevents.tokenization import PromptTokenizer, _packed

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
        assert list(tokenizer.encode(text, add_special_tokens)) == expected


def _long_text(seed: int, words: int = 2400) -> str:
    import random
    rng = random.Random(seed)
    vocabulary = ["alpha", "beta", "gamma", "x1", "42", "don't", "end.", "(see", "it)", "ünï",
                  "中文", "tab\there", "new\nline", "a  b", "<s>", "12345", "!!", "'s"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def test_seams_are_spaces_between_non_spaces_and_shared_with_a_shared_start() -> None:
    from kvroute_router.kvevents.tokenization import PIECE_CHARS, _seams
    text = _long_text(1)
    seams = _seams(text)
    assert len(seams) >= 3
    for at in seams:
        assert text[at] == " " and not text[at - 1].isspace() and not text[at + 1].isspace()
    assert all(b - a >= PIECE_CHARS for a, b in itertools.pairwise(seams))
    other = text[:seams[2] + 2] + _long_text(2)
    assert _seams(other)[:3] == seams[:3]
    assert _seams("x" * 5000) == []  # no space: encoded whole


def test_a_shared_start_is_encoded_once_and_the_pieces_join_up(model_dir: Path) -> None:
    tokenizer = PromptTokenizer.from_directory(model_dir)
    context = _long_text(3)
    for n, question in enumerate(["first question?", "second one", "a third"]):
        text = f"{context}\n[user {n}] {question}"
        for special in (True, False):
            expected = tokenizer.tokenizer.encode(text, add_special_tokens=special).ids
            assert list(tokenizer.encode(text, special)) == expected
    assert tokenizer.piecewise
    assert tokenizer.pieces_reused >= 2 * len(context) // 1024  # the later prompts reused it
    assert tokenizer.pieces_encoded < tokenizer.pieces_reused


def test_a_text_with_seams_is_cached_as_its_pieces_only(model_dir: Path) -> None:
    """A long prompt is remembered as its pieces, never also whole: a new question after a
    shared context adds only that question's pieces, and the same text again costs no
    encoding at all."""
    from kvroute_router.kvevents.tokenization import _seams
    tokenizer = PromptTokenizer.from_directory(model_dir)
    context = _long_text(4)
    first = f"{context}\n[user] a question?"
    expected = tokenizer.tokenizer.encode(first, add_special_tokens=True).ids
    assert list(tokenizer.encode(first, True)) == expected
    assert tokenizer.cache_size() == (len(_seams(first)) + 1, len(expected))
    second = f"{context}\n[user] another, different question"
    assert list(tokenizer.encode(second, True)) == tokenizer.tokenizer.encode(
        second, add_special_tokens=True).ids
    assert tokenizer.cache_size()[0] == len(_seams(first)) + 2  # one new piece: the question
    encoded = tokenizer.pieces_encoded
    assert list(tokenizer.encode(first, True)) == expected  # all from the cache
    assert tokenizer.pieces_encoded == encoded
    short = "a short prompt"  # no seams: cached whole
    tokenizer.encode(short, True)
    assert tokenizer.cache_size()[0] == len(_seams(first)) + 3
    assert list(tokenizer.encode(short, True)) == tokenizer.tokenizer.encode(short).ids
    assert tokenizer.hits == 1


def test_ids_are_handed_out_packed_and_the_cache_cannot_be_changed_through_them(
        model_dir: Path) -> None:
    """Long and short texts come back as ``array('I')`` (the hasher reads their bytes); each
    call gets its own, so a caller changing its ids does not change the cached pieces."""
    tokenizer = PromptTokenizer.from_directory(model_dir)
    for text in (f"{_long_text(11)}\n[user] q?", "a short prompt"):
        expected = tokenizer.tokenizer.encode(text, add_special_tokens=True).ids
        for _ in range(2):  # encoded, then from the cache
            ids = tokenizer.encode(text, True)
            assert isinstance(ids, array) and ids.typecode == "I"
            assert list(ids) == expected
            ids[0] += 1
            ids.append(7)
        assert tokenizer.tokenize("completions", {"prompt": text}) == expected  # a list


def test_a_long_chat_is_cached_as_the_pieces_of_its_text(model_dir: Path) -> None:
    """A chat prompt is cached as its rendered text is (in pieces), not also whole under its
    message list: the cache holds each token once, and the next turn reuses the pieces."""
    tokenizer = PromptTokenizer.from_directory(model_dir)
    messages = [{"role": "system", "content": _long_text(6)}, {"role": "user", "content": "hi"}]
    ids = tokenizer.tokenize("chat", {"messages": messages})
    assert ids is not None
    assert tokenizer.cache_size()[1] == len(ids)
    encoded = tokenizer.pieces_encoded
    more = [*messages, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    assert tokenizer.tokenize("chat", {"messages": more}) is not None
    assert tokenizer.pieces_encoded == encoded + 1  # only the new last piece


def test_byte_level_bpe_pieces_join_up() -> None:
    """A trained byte-level BPE (the GPT-2 / Llama-3 family's pre-tokenizer): every check of
    joined pieces against the whole encoding passes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_long_text(s, 300) for s in range(20)],
                            trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PromptTokenizer(bpe)
    for seed in range(10, 40):
        text = _long_text(seed)
        assert list(tokenizer.encode_long(text, False)) == bpe.encode(text).ids
    assert tokenizer.piecewise


def test_a_tokenizer_whose_pieces_do_not_join_is_encoded_whole(model_dir: Path) -> None:
    """A normalizer that prepends to every text (Llama-2's legacy tokenizers) makes each piece
    start differently from the same text in place: the first check sees it and turns the
    piecewise path off; every answer is still the whole text's ids."""
    from tokenizers import Tokenizer, normalizers
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.normalizer = normalizers.Prepend("@")
    tokenizer = PromptTokenizer(raw)
    text = _long_text(5)
    assert list(tokenizer.encode(text, True)) == raw.encode(text, add_special_tokens=True).ids
    assert not tokenizer.piecewise
    other = _long_text(6)
    assert list(tokenizer.encode(other, True)) == raw.encode(other, add_special_tokens=True).ids


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
            ids = _packed([rng.randrange(1000, 128_000) for _ in range(1000)])
            assert ids is not None
            tokenizer._remember(i.to_bytes(16, "big"), ids)
            del ids
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tokenizer.cache_size() == (prompts, prompts * 1000)
    assert used / (prompts * 1000) < 6  # bytes per cached token (was ~40)
    # What comes back is what went in, as a fresh array.
    stored = _packed([5, 70_000, 2**32 - 1])
    assert stored is not None
    tokenizer._remember(b"k" * 16, stored)
    found = tokenizer._cached(b"k" * 16)
    assert found == stored and found is not stored
    assert _packed([-1]) is None and _packed([2**32]) is None  # not token ids: never cached


def test_a_sampled_check_runs_off_the_request_path_and_its_verdict_applies_next(
        model_dir: Path) -> None:
    """After the first checks, one joined encoding in SEAM_CHECK_EVERY is compared with the
    whole encoding in a worker thread: that text gets its joined ids at once, and a difference
    turns the piecewise path off (and forgets the cached texts) before the next text."""
    from kvroute_router.kvevents.tokenization import SEAM_CHECK_EVERY
    from tokenizers import Tokenizer, normalizers
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.normalizer = normalizers.Prepend("@")
    tokenizer = PromptTokenizer(raw)
    tokenizer._joined = SEAM_CHECK_EVERY - 1  # past the checks made on the spot
    text = _long_text(7)
    joined = tokenizer.encode(text, True)
    assert list(joined) != raw.encode(text, add_special_tokens=True).ids  # not checked on the spot
    assert tokenizer.piecewise
    assert tokenizer._check is not None and tokenizer._check.result(timeout=30)
    other = _long_text(8)
    assert list(tokenizer.encode(other, True)) == raw.encode(other, add_special_tokens=True).ids
    assert not tokenizer.piecewise
    # the first text's joined ids were forgotten with the cache
    assert list(tokenizer.encode(text, True)) == raw.encode(text, add_special_tokens=True).ids


def test_a_sampled_check_that_passes_keeps_the_piecewise_path(model_dir: Path) -> None:
    from kvroute_router.kvevents.tokenization import SEAM_CHECK_EVERY
    tokenizer = PromptTokenizer.from_directory(model_dir)
    tokenizer._joined = SEAM_CHECK_EVERY - 1
    text = _long_text(9)
    assert list(tokenizer.encode(text, True)) == tokenizer.tokenizer.encode(text).ids
    assert tokenizer._check is not None and not tokenizer._check.result(timeout=30)
    assert tokenizer.encode(_long_text(10), True)
    assert tokenizer.piecewise

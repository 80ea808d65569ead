"""The NumPy all-MiniLM-L6-v2 against PyTorch: the engine venv's transformers ``AutoModel`` runs
the same model folder (mean pooling over the attention mask, L2 normalisation, truncation to
256) and every sentence's vectors must agree to cosine similarity > 0.999.

The engine interpreter is $KVROUTE_ENGINE_PYTHON, else ``scripts/kvenv.sh engine``."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from kvroute_router.batching.embedding import MiniLmModel

REFERENCE = r"""
import json, sys
import torch
from transformers import AutoModel, AutoTokenizer

folder = sys.argv[1]
texts = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModel.from_pretrained(folder).eval()
with torch.no_grad():
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
lengths = encoded["attention_mask"].sum(1).tolist()
print(json.dumps({"vectors": vectors.tolist(), "lengths": lengths}))
"""

SENTENCES = [
    "Hello world.",
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Which of the following is a function of the liver?\nA. bile production\nB. insulin\n"
    "C. red blood cells\nD. none of the above",
    "ÜBER naïve café — résumé; 数学 and emoji 🙂 tokens",
    "",
    "long " * 400 + "tail that truncation removes",
    "The integral of x^2 from 0 to 3 is 9.",
]


def test_numpy_minilm_matches_transformers() -> None:
    from kvroute_cli.localengines import engine_python

    model = MiniLmModel()
    ours = model.encode(SENTENCES)
    result = subprocess.run([engine_python(), "-c", REFERENCE, str(model.model_dir)],
                            input=json.dumps(SENTENCES), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    theirs = np.asarray(reference["vectors"], dtype=np.float64)
    assert theirs.shape == ours.shape == (len(SENTENCES), 384)
    # Same tokenisation (incl. truncation to 256 and the special tokens).
    assert [len(ids) for ids in model.tokenize(SENTENCES)] == reference["lengths"]
    cosine = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1)
                                              * np.linalg.norm(theirs, axis=1))
    assert cosine.min() > 0.999, dict(zip(SENTENCES, cosine.round(6).tolist(), strict=True))
    assert np.abs(ours - theirs).max() < 1e-4

"""Builds the small test model that real vLLM-CPU engines serve in tests, the demo and benches.

No download: a Llama-shaped ``config.json`` (served with ``--load-format dummy``, i.e. random
weights) and a byte-level tokenizer built with the ``tokenizers`` library — one byte is one
token, so token counts are exact and deterministic — plus a chat template. The files are what
``transformers``' ``save_pretrained`` writes for a fast tokenizer, so vLLM loads them as-is.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "num_hidden_layers": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}


def build_tokenizer() -> Tokenizer:
    """A byte-level tokenizer without merges: 256 byte tokens, then the special tokens."""
    vocab = {chr(c): i for i, c in enumerate(_byte_chars())}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _byte_chars() -> list[int]:
    """GPT-2's byte-to-unicode table, in byte order (what ByteLevel pre-tokenization emits)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return [chars[b] for b in range(256)]


def build_test_model(directory: Path, name: str = "kvroute-test-model") -> Path:
    """Write the model folder (idempotent) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(MODEL_CONFIG, vocab_size=256 + len(SPECIAL_TOKENS), _name_or_path=name)
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    build_tokenizer().save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2),
                                                     encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2),
                                                       encoding="utf-8")
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 256, "eos_token_id": 257}), encoding="utf-8")
    return directory

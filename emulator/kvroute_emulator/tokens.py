"""The served model's tokenizer and chat template, applied the way vLLM applies them.

vLLM's OpenAI server tokenizes a completion prompt with the tokenizer's special tokens
(``add_special_tokens=True``: a BOS where the tokenizer's post-processor adds one) and a chat
conversation by rendering the chat template (Hugging Face's sandboxed Jinja environment,
``trim_blocks`` and ``lstrip_blocks``, ``add_generation_prompt=True``) and tokenizing the result
*without* adding special tokens (the template writes them). The model folder is what
``transformers``' ``save_pretrained`` writes: ``tokenizer.json`` and ``tokenizer_config.json``
(whose ``chat_template`` and ``bos_token``/``eos_token`` are read here).

Output tokens are not sampled from anything: an emulated engine cycles through the ids of a
fixed English text, starting at an offset derived from the request, so the text it streams is
readable and the same request gives the same answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

FILLER = ("The quick brown fox jumps over the lazy dog while the engine streams tokens "
          "at a steady pace and the router keeps every prefix where it was computed. ")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (no template, or the template raised)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@dataclass
class ServedModel:
    """One model as an emulated engine serves it: name, tokenizer, template, context length."""

    name: str
    tokenizer: Tokenizer
    chat_template: str | None
    special: dict[str, str]
    max_model_len: int
    output_ids: list[int]

    @classmethod
    def load(cls, model_dir: Path, name: str, max_model_len: int) -> ServedModel:
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: the model folder needs a "
                                    "tokenizer.json (what save_pretrained writes)")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config: dict[str, Any] = {}
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: vLLM uses "default"
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        special = {k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if isinstance(v := config.get(k), str)}
        output_ids = tokenizer.encode(FILLER, add_special_tokens=False).ids
        return cls(name=name, tokenizer=tokenizer,
                   chat_template=template if isinstance(template, str) else None,
                   special=special, max_model_len=max_model_len,
                   output_ids=output_ids or [0])

    def encode_prompt(self, prompt: str) -> list[int]:
        """A completion prompt's ids (special tokens added as the tokenizer defines)."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def render_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("the model has no chat template; use /v1/completions")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages,
                                   add_generation_prompt=add_generation_prompt,
                                   **self.special)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template error is the caller's input problem
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_str(self, token_id: int) -> str:
        return str(self.tokenizer.id_to_token(token_id) or "")

    def output_tokens(self, seed: int, count: int) -> list[int]:
        """``count`` output ids for a request: the filler text's ids from an offset."""
        pool = self.output_ids
        start = seed % len(pool)
        return [pool[(start + i) % len(pool)] for i in range(count)]

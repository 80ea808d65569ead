"""Prompt → token ids exactly as the vLLM engine computes them, so block hashes line up.

In process, from the pool's tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``) with
the ``tokenizers`` library:

* **completions**: a string prompt is encoded with ``add_special_tokens`` as the request says
  (vLLM's default for completions: ``True``, so a BOS post-processor applies); token-id prompts
  are used as they are;
* **chat**: the chat template is rendered the way ``transformers``' ``apply_chat_template`` does
  (which vLLM calls): a sandboxed Jinja2 environment with ``trim_blocks``/``lstrip_blocks`` and
  loop controls, ``raise_exception``/``strftime_now`` globals, a ``tojson`` filter, the special
  tokens of ``tokenizer_config.json`` as variables, ``add_generation_prompt`` (default ``True``)
  and the request's ``chat_template_kwargs``. The text is then encoded with
  ``add_special_tokens`` defaulting to ``False`` (vLLM's chat default). Text-part lists are
  joined with newlines for templates that read ``content`` as a string, as vLLM does.

Long texts are encoded in pieces cut at *seams* — the first space after every
:data:`PIECE_CHARS` characters that sits between two non-space characters — and each piece's
ids are cached under a digest of the text up to its end, so a prompt that repeats another's
first thousands of characters (a tenant's context, a system prompt, a conversation so far)
encodes only what follows the shared part. That the pieces' ids, joined, equal the whole
text's ids is a property of the tokenizer (byte-level BPE and Metaspace pre-tokenizers split
before such a space; a normalizer that prepends to every text does not): the first
:data:`SEAM_CHECKS` joined encodings of every tokenizer are compared with a whole encoding
on the spot, one in :data:`SEAM_CHECK_EVERY` after that in a worker thread (off the request's
path; the next text sees the verdict), and one difference turns the piecewise path off for
that tokenizer (with a warning) and forgets the texts encoded so far.

Anything the in-process path cannot reproduce faithfully (``continue_final_message``, tools,
non-text parts, templates that fail to render) returns ``None`` from :meth:`tokenize`; the async
:meth:`tokenize_via_engine` asks the engine's own ``/tokenize`` instead. Results are kept in a
bounded LRU cache keyed by a digest of the text (or its pieces, for a text with seams) and the
options that change the tokens. Its ids are kept as 4-byte unsigned integers (``array('I')``):
at the default bound of 4M tokens that is ~16 MB per pool whatever the vocabulary; as a tuple
of Python ints it was ~33 MB with the byte-level test model and ~160 MB with a 128k vocabulary
(an int object per id above 256), a cache the soak benchmark first took for a leak
(docs/benchmarks/soak.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from kvroute_router.kvevents.hashing import is_packed
from kvroute_router.openai.errors import BadRequestError
from kvroute_router.openai.requests import CompletionRequest, OpenAIRequest, parse_request

logger = logging.getLogger("kvroute.kvevents.tokenization")

DEFAULT_CACHE_TOKENS = 4_000_000
PIECE_CHARS = 1024
"""Characters between seams (texts shorter than two pieces are encoded whole)."""
SEAM_SEARCH_CHARS = 256
"""How far past each multiple of :data:`PIECE_CHARS` a seam is looked for."""
SEAM_CHECKS = 16
SEAM_CHECK_EVERY = 64
_CHECKER: ThreadPoolExecutor | None = None
_CHECKER_LOCK = threading.Lock()


def _checker() -> ThreadPoolExecutor:
    """The one worker thread of the sampled seam checks (started on first use)."""
    global _CHECKER
    with _CHECKER_LOCK:
        if _CHECKER is None:
            _CHECKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seam-check")
        return _CHECKER
_CONTENT_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


class ChatTemplateError(ValueError):
    """The chat template could not be rendered for these messages."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _special_token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _text_key(text: str, add_special_tokens: bool) -> bytes:
    """The cache key of a text's whole encoding: a digest of its UTF-8 bytes (no JSON
    rendering of a long prompt: ~45 -> ~10 us at 8k characters). Its length (20 bytes) keeps
    it apart from the JSON-digest keys (16) and the piece keys (21)."""
    digest = hashlib.blake2b(b"special" if add_special_tokens else b"plain", digest_size=16)
    digest.update(text.encode("utf-8", "surrogatepass"))
    return b"text" + digest.digest()


TokenIds = Sequence[int]
"""Token ids as this module hands them out: an ``array('I')`` of 4-byte unsigned ids the caller
owns, or a list when an id does not fit (no tokenizer makes one). Packed, a long prompt joined
from cached pieces is a copy of bytes instead of thousands of int objects (~150 us at 7k ids
of a 128k vocabulary, ~4 us packed), and the block hasher reads its bytes as they are. Compare
with ``list(ids)``: an array never equals a list."""


def _packed(ids: Sequence[int]) -> array[int] | None:
    """``ids`` as an ``array('I')`` (the object itself if it is one), ``None`` if one does not
    fit in 4 unsigned bytes."""
    if is_packed(ids):
        return ids
    try:
        return array("I", ids)
    except (OverflowError, TypeError):
        return None


def _seams(text: str) -> list[int]:
    """Where :meth:`PromptTokenizer.encode_long` cuts ``text``: for every multiple of
    :data:`PIECE_CHARS` (except the last), the first space at or after it, within
    :data:`SEAM_SEARCH_CHARS`, that has a non-space character on both sides. A seam depends
    only on the text before it and two characters after, so texts that share a start share
    its seams."""
    seams: list[int] = []
    last = len(text) - PIECE_CHARS
    target = PIECE_CHARS
    while target <= last:
        at = text.find(" ", target, target + SEAM_SEARCH_CHARS)
        while at != -1 and (text[at - 1].isspace() or text[at + 1:at + 2].isspace()
                            or at + 1 >= len(text)):
            at = text.find(" ", at + 1, target + SEAM_SEARCH_CHARS)
        if at != -1:
            seams.append(at)
            target = at + PIECE_CHARS
        else:
            target += SEAM_SEARCH_CHARS
    return seams


class PromptTokenizer:
    """Tokenises completions and chat prompts like one pool's engines do."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None,
                 cache_tokens: int = DEFAULT_CACHE_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.cache_tokens = cache_tokens
        self._cache: OrderedDict[bytes, array[int]] = OrderedDict()
        self._cached_tokens = 0
        self.hits = 0
        self.misses = 0
        self.pieces_reused = 0
        self.pieces_encoded = 0
        self.piecewise = True
        """Whether long texts are encoded in cached pieces (off after a failed check)."""
        self._joined = 0
        self._check: Future[bool] | None = None
        """The sampled seam check running in the worker thread, if any."""
        self._seam_mismatch = False
        """Set (by the worker thread) when a sampled check found joined pieces differ."""
        self._template: jinja2.Template | None = None
        self._content_as_parts = False
        if chat_template is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(chat_template)
            self._content_as_parts = bool(_CONTENT_LOOP.search(chat_template))

    @classmethod
    def from_directory(cls, directory: Path, **kwargs: Any) -> PromptTokenizer:
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (template and
        special tokens) from a model folder."""
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: vLLM uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        special = {key: text for key, value in config.items()
                   if key.endswith("_token") and (text := _special_token_text(value)) is not None}
        return cls(tokenizer, chat_template=template if isinstance(template, str) else None,
                   special_tokens=special, **kwargs)

    # -- cache -------------------------------------------------------------------------------
    def cache_size(self) -> tuple[int, int]:
        """(prompts, tokens) cached now; tokens are bounded by ``cache_tokens``."""
        return len(self._cache), self._cached_tokens

    def _cached(self, key: bytes) -> array[int] | None:
        found = self._cache.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._cache.move_to_end(key)
        return found[:]  # a copy the caller owns (of bytes: no int objects made)

    def _remember(self, key: bytes, ids: array[int]) -> None:
        """Cache packed ``ids`` under ``key`` (the cache keeps this object: pass one nobody
        else changes)."""
        if len(ids) > self.cache_tokens:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_tokens -= len(old)
        self._cache[key] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > self.cache_tokens and self._cache:
            _, evicted = self._cache.popitem(last=False)
            self._cached_tokens -= len(evicted)

    @staticmethod
    def _key(*parts: Any) -> bytes:
        return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"),
                               digest_size=16).digest()

    # -- tokenising --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool) -> TokenIds:
        """``text`` → token ids (cached).

        A text cut into pieces is cached as its pieces (the last one, after the last seam,
        included: a prompt sent again costs no encoding), not also whole: remembering every
        long prompt whole cost each new one a copy of all its ids (~0.1 ms at 7k tokens, on
        every request whose prompt ends with a new question) and filled the cache with whole
        prompts rarely sent twice, pushing out the shared pieces. A text without seams
        (short, or no usable space) is cached whole."""
        if self._seam_mismatch and self.piecewise:  # a sampled check found a difference
            self._stop_piecewise()
        seams = _seams(text) if self.piecewise else []
        if seams:
            return self.encode_long(text, add_special_tokens, seams)
        key = _text_key(text, add_special_tokens)
        found = self._cached(key)
        if found is not None:
            return found
        ids = self.encode_uncached(text, add_special_tokens)
        packed = _packed(ids)
        if packed is None:  # not a token id a tokenizer makes: not cached
            return ids
        self._remember(key, packed)
        return packed[:]

    def encode_long(self, text: str, add_special_tokens: bool,
                    seams: list[int] | None = None) -> TokenIds:
        """``text`` → token ids, reusing the cached pieces of any text that shared its start
        (see the module docstring); a whole encoding for short texts or when the pieces were
        found not to join up for this tokenizer. ``seams``: :func:`_seams` of ``text``, when
        the caller has them."""
        if self._seam_mismatch and self.piecewise:  # a sampled check found a difference
            self._stop_piecewise()
            seams = None
        if seams is None:
            seams = _seams(text) if self.piecewise else []
        if not seams or not self.piecewise:
            return self.encode_uncached(text, add_special_tokens)
        bounds = [0, *seams, len(text)]
        digest = hashlib.blake2b(b"special" if add_special_tokens else b"plain",
                                 digest_size=16)
        keys: list[bytes] = []
        for start, stop in itertools.pairwise(bounds):  # the last key: the whole text's
            digest.update(text[start:stop].encode("utf-8", "surrogatepass"))
            keys.append(b"piece" + digest.digest())
        pieces: list[Sequence[int] | None] = []
        for key in keys:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            pieces.append(found)
        missing = [i for i, piece in enumerate(pieces) if piece is None]
        texts = [text[bounds[i]:bounds[i + 1]] for i in missing]
        fast = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encoded: list[list[int]] = []
        if missing and missing[0] == 0:  # the first piece carries the special tokens (BOS)
            encoded.append(fast(texts[:1], add_special_tokens=add_special_tokens)[0].ids)
        rest = texts[len(encoded):]
        encoded += [e.ids for e in fast(rest, add_special_tokens=False)] if rest else []
        all_packed = True
        for i, ids in zip(missing, encoded, strict=True):
            packed = _packed(ids)
            if packed is None:
                all_packed = False
                pieces[i] = ids
            else:
                pieces[i] = packed
                self._remember(keys[i], packed)
        self.pieces_reused += len(keys) - len(missing)
        self.pieces_encoded += len(missing)
        joined: TokenIds
        if all_packed:  # a copy of bytes per piece, not an int object per id
            joined = array("I")
            for piece in pieces:
                joined.extend(piece)  # type: ignore[arg-type]  # arrays of "I", all of them
        else:
            joined = list(itertools.chain.from_iterable(p for p in pieces if p is not None))
        self._joined += 1
        if self._joined <= SEAM_CHECKS:
            whole = self.encode_uncached(text, add_special_tokens)
            if whole != list(joined):
                self._stop_piecewise()
                return whole
        elif self._joined % SEAM_CHECK_EVERY == 0 and (
                self._check is None or self._check.done()):
            # The sampled checks run beside the event loop (the encode releases the GIL): a
            # whole encoding of a long prompt (~3-6 ms at 8k tokens) on the request path was
            # the router's added latency of one request in 64.
            # A copy: the caller owns (and may change) the ids it is given.
            self._check = _checker().submit(self._seams_differ, text, add_special_tokens,
                                            joined[:])
        return joined

    def _seams_differ(self, text: str, add_special_tokens: bool, joined: TokenIds) -> bool:
        """A sampled check (worker thread): flags a difference for the next caller."""
        differ = self.encode_uncached(text, add_special_tokens) != list(joined)
        if differ:
            self._seam_mismatch = True
        return differ

    def _stop_piecewise(self) -> None:
        """The pieces were found not to join up: long texts are encoded whole from now on, and
        the cached whole-text ids (joined from pieces) are forgotten."""
        self.piecewise = False
        self._cache.clear()
        self._cached_tokens = 0
        logger.warning("this tokenizer's ids differ when a text is encoded in pieces "
                       "cut before a space; long prompts are encoded whole from now on")

    def encode_uncached(self, text: str, add_special_tokens: bool) -> list[int]:
        """``text`` → token ids without the cache.

        ``encode_batch_fast`` (tokenizers >= 0.20) gives the same ids as ``encode`` but skips
        the character offsets nobody here needs: about 2.5x faster on a 4k-token prompt.
        """
        fast = getattr(self.tokenizer, "encode_batch_fast", None)
        if fast is not None:
            ids: list[int] = fast([text], add_special_tokens=add_special_tokens)[0].ids
            return ids
        slow: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return slow

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The chat template applied to ``messages``, as ``apply_chat_template(tokenize=False)``."""
        if self._template is None:
            raise ChatTemplateError("the tokenizer has no chat_template")
        conversation = [self._normalise(message) for message in messages]
        variables: dict[str, Any] = dict(self.special_tokens)
        variables.update(chat_template_kwargs or {})
        variables.update(messages=conversation, tools=None, documents=None,
                         add_generation_prompt=add_generation_prompt)
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def _normalise(self, message: Mapping[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        out = dict(message)
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ChatTemplateError("only text content parts are tokenised in process")
                texts.append(part["text"])
            out["content"] = ([{"type": "text", "text": t} for t in texts]
                              if self._content_as_parts else "\n".join(texts))
        return out

    def tokenize(self, kind: str, body: Mapping[str, Any] | None, *,
                 prompt_text: str = "", token_ids: Sequence[int] | None = None,
                 ) -> list[int] | None:
        """Token ids of a completions or chat body given as a dict (tests, benchmarks), as a
        list, or ``None`` if only the engine can say; the router itself calls
        :meth:`tokenize_request` with the request it parsed once."""
        if token_ids is not None:
            return list(token_ids)
        fields: dict[str, Any] = {"model": "-", **(body or {})}
        if kind != "chat" and "prompt" not in fields:
            fields["prompt"] = prompt_text
        try:
            parsed = parse_request(fields, "chat" if kind == "chat" else "completions")
        except BadRequestError:
            return None
        ids = self.tokenize_request(parsed)
        return None if ids is None else list(ids)

    def tokenize_request(self, request: OpenAIRequest) -> TokenIds | None:
        """Token ids of a parsed request (a batch of prompts: its routing prompt), packed (see
        :data:`TokenIds`), or ``None`` if only the engine can say."""
        if isinstance(request, CompletionRequest):
            prompt = request.routing_prompt
            if isinstance(prompt, tuple):
                return list(prompt)
            return self.encode(prompt, request.add_special_tokens)
        if request.continue_final_message or request.tools or request.chat_template \
                or self._template is None:
            return None
        kwargs = request.chat_template_kwargs or {}
        try:
            text = self.render_chat(list(request.messages),
                                    add_generation_prompt=request.add_generation_prompt,
                                    chat_template_kwargs=kwargs)
        except ChatTemplateError as exc:
            logger.debug("in-process chat rendering declined: %s", exc)
            return None
        # Cached as any text is (encode): a conversation's earlier turns are the start of the
        # next turn's text, so its pieces are reused, and no key of the whole message list is
        # built for every request.
        return self.encode(text, request.add_special_tokens)

    async def tokenize_via_engine(self, session: aiohttp.ClientSession, base_url: str,
                                  model: str, kind: str, body: Mapping[str, Any],
                                  timeout_s: float = 2.0) -> list[int] | None:
        """Ask an engine's ``/tokenize`` (the fallback); the answer is cached like ours."""
        request: dict[str, Any] = {"model": model}
        if kind == "chat":
            request.update(messages=body.get("messages"),
                           add_generation_prompt=body.get("add_generation_prompt", True),
                           add_special_tokens=body.get("add_special_tokens", False))
            for option in ("continue_final_message", "chat_template_kwargs", "tools",
                           "chat_template"):
                if body.get(option) is not None:
                    request[option] = body[option]
        else:
            request.update(prompt=body.get("prompt"),
                           add_special_tokens=body.get("add_special_tokens", True))
        key = self._key("engine", request)
        found = self._cached(key)
        if found is not None:
            return found.tolist()
        try:
            async with session.post(f"{base_url}/tokenize", json=request,
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    return None
                answer = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("engine /tokenize at %s failed: %s", base_url, exc)
            return None
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            return None
        packed = _packed(tokens)
        if packed is not None:  # the engine's answer holds token ids, as it should
            self._remember(key, packed)
        return list(tokens)

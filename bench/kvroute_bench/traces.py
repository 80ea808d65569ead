"""Public request traces replayed by ``kvroute bench --trace FILE``.

Two JSONL formats, one request per line (detected from the first line, or ``--trace-format``):

* **Mooncake** (the FAST'25 Mooncake traces; also what Dynamo and aiperf replay):
  ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``. Each hash id
  names a 512-token block; equal ids are equal content. Block contents are synthesised
  deterministically from the id (seeded pseudo-words; the test model's tokenizer is one token
  per byte, so 512 characters are 512 tokens), the prompt is the blocks in order cut to
  ``input_length``, and a prompt longer than its blocks is padded with text unique to it.
* **OpenAI-style**: ``{"timestamp": ms}`` or ``{"arrival_s": s}``, then ``"messages"`` (chat,
  sent to ``/v1/chat/completions``) or ``"prompt"``, and ``"max_tokens"``.

``time_scale`` multiplies every arrival time (0.5 replays twice as fast). Requests whose prompt
and output do not fit ``max_context`` are cut at the end of the prompt (counted in the
summary). Only tiny synthetic traces ship with kvroute (``bench/traces/``); bring your own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvroute_bench.workloads import CONTEXT_MARGIN, Trace, TraceRequest, _rng, make_text

MOONCAKE_BLOCK_TOKENS = 512
_BLOCK, _PAD = 101, 102


class TraceFormatError(ValueError):
    """A trace line that is not one of the formats; names the line."""


@dataclass(frozen=True)
class TraceOptions:
    path: Path
    format: str = "auto"  # auto | mooncake | openai
    time_scale: float = 1.0
    max_context: int = 32768
    limit: int = 0  # first N requests (0: all)
    seed: int = 0


def _detect(first: dict[str, Any]) -> str:
    if "hash_ids" in first or "input_length" in first:
        return "mooncake"
    if "messages" in first or "prompt" in first:
        return "openai"
    raise TraceFormatError("line 1: neither Mooncake (hash_ids, input_length) nor "
                           "OpenAI-style (messages or prompt)")


def _arrival(line_no: int, row: dict[str, Any]) -> float:
    if "arrival_s" in row:
        value = row["arrival_s"]
        scale = 1.0
    elif "timestamp" in row:
        value = row["timestamp"]
        scale = 1e-3
    else:
        raise TraceFormatError(f"line {line_no}: no timestamp (ms) or arrival_s")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TraceFormatError(f"line {line_no}: arrival time must be a number >= 0")
    return float(value) * scale


def _positive_int(line_no: int, row: dict[str, Any], key: str, default: int | None = None
                  ) -> int:
    value = row.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TraceFormatError(f"line {line_no}: {key} must be an integer >= 1")
    return value


def _block_text(seed: int, block_id: int) -> str:
    head = f"[b{block_id}]"
    return head + make_text(_rng(seed, _BLOCK, block_id), MOONCAKE_BLOCK_TOKENS - len(head))


def load(options: TraceOptions) -> Trace:
    lines = [line for line in options.path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if not lines:
        raise TraceFormatError(f"{options.path} holds no requests")
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(f"line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TraceFormatError(f"line {n}: not a JSON object")
        rows.append(row)
        if options.limit and len(rows) >= options.limit:
            break
    fmt = _detect(rows[0]) if options.format == "auto" else options.format
    if fmt not in ("mooncake", "openai"):
        raise TraceFormatError(f"unknown trace format {fmt!r}; valid: auto, mooncake, openai")
    requests: list[TraceRequest] = []
    clipped = 0
    blocks: dict[int, str] = {}
    start = _arrival(1, rows[0])
    for n, row in enumerate(rows, start=1):
        at = (_arrival(n, row) - start) * options.time_scale
        messages: tuple[tuple[str, str], ...] | None = None
        if fmt == "mooncake":
            length = _positive_int(n, row, "input_length")
            output = _positive_int(n, row, "output_length")
            ids = row.get("hash_ids", [])
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise TraceFormatError(f"line {n}: hash_ids must be a list of integers")
            text = "".join(blocks.setdefault(i, _block_text(options.seed, i)) for i in ids)
            if len(text) < length:
                text += make_text(_rng(options.seed, _PAD, n), length - len(text))
            prompt = text[:length]
            shared = min(len(prompt), MOONCAKE_BLOCK_TOKENS * len(ids))
            group = f"block-{ids[0]}" if ids else f"req-{n}"
        else:
            output = _positive_int(n, row, "max_tokens", 128)
            if "messages" in row:
                raw = row["messages"]
                if not isinstance(raw, list) or not raw or not all(
                        isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str) for m in raw):
                    raise TraceFormatError(f"line {n}: messages must be a list of "
                                           "{role, content} objects with string values")
                messages = tuple((m["role"], m["content"]) for m in raw)
                prompt = "\n".join(c for _, c in messages)
            elif isinstance(row.get("prompt"), str):
                prompt = row["prompt"]
            else:
                raise TraceFormatError(f"line {n}: messages or a string prompt is needed")
            shared, group = 0, f"req-{n}"
        room = options.max_context - CONTEXT_MARGIN - output
        if len(prompt) > room:
            clipped += 1
            if room < 1:
                raise TraceFormatError(f"line {n}: output length {output} leaves no room "
                                       f"for a prompt in a {options.max_context}-token context")
            if messages is None:
                prompt = prompt[:room]
            else:  # cut the last message's text
                overflow = len(prompt) - room
                role, content = messages[-1]
                messages = (*messages[:-1], (role, content[:max(1, len(content) - overflow)]))
                prompt = "\n".join(c for _, c in messages)
        requests.append(TraceRequest(index=n - 1, arrival_s=at, prompt=prompt,
                                     max_tokens=output, group=group,
                                     shared_tokens=min(shared, len(prompt)),
                                     messages=messages))
    requests.sort(key=lambda r: (r.arrival_s, r.index))
    requests = [TraceRequest(index=i, arrival_s=r.arrival_s, prompt=r.prompt,
                             max_tokens=r.max_tokens, group=r.group,
                             shared_tokens=r.shared_tokens, messages=r.messages)
                for i, r in enumerate(requests)]
    name = f"trace-{options.path.stem}"
    params = {"trace": str(options.path), "format": fmt, "time_scale": options.time_scale,
              "max_context": options.max_context, "clipped": clipped, "seed": options.seed}
    return Trace(workload=name, params=params, requests=requests)

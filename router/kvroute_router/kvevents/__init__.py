"""Precise prefix-cache routing from vLLM KV events.

The pieces, each usable alone: :mod:`.hashing` (vLLM-compatible block hashes),
:mod:`.tokenization` (prompt → token ids exactly as the engine tokenises), :mod:`.events` (the KV
event wire format), :mod:`.subscriber` (one ZMQ subscriber per engine with replay and restart
detection), :mod:`.index` (the block → endpoints index with longest-prefix matching),
:mod:`.metrics` and :mod:`.scorer` (the ``prefix-precise`` scheduling plugin). See
``docs/kv-events.md``.
"""

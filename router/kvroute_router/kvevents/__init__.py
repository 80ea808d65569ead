"""Precise prefix-cache routing from vLLM KV events.

The pieces, each usable alone: :mod:`.hashing` (vLLM-compatible block hashes),
:mod:`.tokenization` (prompt → token ids exactly as the engine tokenises), :mod:`.events` (the KV
event wire format), :mod:`.subscriber` (one ZMQ subscriber per engine with replay and restart
detection), :mod:`.index` (the block → endpoints index with longest-prefix matching),
:mod:`.metrics`, :mod:`.hub` (one pool's index and subscribers) and :mod:`.feed` (wires it into
the router and registers ``plugins.prefix_precise`` over it). See
``docs/kv-events.md``.
"""

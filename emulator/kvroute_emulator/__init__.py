"""kvroute's vLLM-compatible engine emulator: many emulated engines in one process.

Each emulated engine answers vLLM's OpenAI API (``/v1/completions``, ``/v1/chat/completions``,
streaming or not), ``/tokenize``, ``/v1/models``, ``/health``, ``/reset_prefix_cache`` and
``/metrics`` with vLLM's series, and publishes KV events over ZMQ (PUB + replay) with vLLM's
framing and ``sha256_cbor`` block hashes of the served model's tokens. Its timing comes from the
engine model in :mod:`kvroute_emulator.model` (the one the fleet simulator uses) run in real
time, slowed by a time-dilation factor so a small machine keeps up with a large fleet.

Modules: :mod:`~kvroute_emulator.tokens` (tokenizer and chat template, as vLLM applies them),
:mod:`~kvroute_emulator.hashing` (vLLM's block hashes), :mod:`~kvroute_emulator.kvevents`
(ZMQ publisher), :mod:`~kvroute_emulator.engine` (one engine in real time, faults),
:mod:`~kvroute_emulator.metrics` (the ``/metrics`` page), :mod:`~kvroute_emulator.server`
(HTTP), :mod:`~kvroute_emulator.fleet` (N engines and the admin endpoint) and
:mod:`~kvroute_emulator.cli` (``python -m kvroute_emulator`` / ``kvroute engines --emulate``).

It imports none of kvroute's other packages (an import-linter contract), so what it emits is
vLLM's behaviour as written down here, never the router's expectations.
"""

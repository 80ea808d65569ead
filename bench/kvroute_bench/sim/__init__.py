"""The fleet simulator: discrete-event models of vLLM engines, for fleets one machine cannot run.

:mod:`~kvroute_emulator.model.profile` holds the cost profiles (the CPU test engines, an 8B model on
one H100), :mod:`~kvroute_emulator.model.engine` one engine (continuous batching, chunked prefill,
prefix cache with LRU eviction and KV capacity, vLLM-shaped metrics and KV events) and
:mod:`~kvroute_bench.sim.fleet` the event loop that sends a trace through a picker.
"""

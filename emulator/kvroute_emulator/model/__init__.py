"""The engine model shared by the fleet simulator and the emulator: one vLLM engine's scheduler
(continuous batching, chunked prefill, LRU prefix cache inside a KV capacity) and its cost
profiles. The simulator drives it on a virtual clock, the emulator in (dilated) real time."""

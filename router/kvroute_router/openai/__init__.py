"""The OpenAI wire format, read once: decoding and validating bodies into typed requests
(:mod:`.requests`), their normalised bounds, the upstream body rewrite (:mod:`.upstream`),
usage and SSE reading (:mod:`.usage`) and error bodies (:mod:`.errors`).

It depends on nothing else in the router; the three servers (proxy, ext_proc, gRPC Pick) and
the plugins read requests only through the typed objects this package builds.
"""

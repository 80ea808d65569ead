"""The scheduling framework: the interfaces plugins implement (Filter, Scorer, Picker), the
per-request CycleState, the read-only Endpoint view, the plugin registry and scheduler profiles.

Plugins live in :mod:`kvroute_router.plugins`; what the framework needs to know about them
(default filters, fallbacks, prefix scorers) they declare when they register. This package
imports none of them.
"""

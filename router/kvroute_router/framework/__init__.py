"""The scheduling framework: the interfaces plugins implement (Filter, Scorer, Picker), the
per-request CycleState, the read-only Endpoint view, the plugin registry and scheduler profiles.

Plugins live in :mod:`kvroute_router.plugins` (built-ins) or in other subpackages
(``kvevents``'s precise prefix scorer, ``budget``'s admission); this package imports none of
them.
"""

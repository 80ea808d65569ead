"""Fixtures of the loopback tier's tests that run real routers in front of emulated engines:
the byte-level test model (built once per session) and a two-engine emulated fleet on the
test's event loop (``tests/emulated.py``). A module that needs another fleet shape overrides
``fleet``."""

from tests.emulated import fleet, model_dir

__all__ = ["fleet", "model_dir"]  # fixtures, registered by importing them here

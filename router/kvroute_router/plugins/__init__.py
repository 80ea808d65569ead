"""Built-in scheduler plugins, one module each, and :func:`register_builtin_plugins`."""

from kvroute_router.plugins.builtin import register_builtin_plugins

__all__ = ["register_builtin_plugins"]

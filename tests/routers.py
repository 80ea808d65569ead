"""A real router (``kvroute_router.app.Router``) on loopback for one test: started from its
settings, yielded with its HTTP base URL, and stopped however the test ends — the one home of
that set-up for the tiers that run a router in-process (unit, loopback, e2e)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from kvroute_router.app import Router, RouterSettings


def http_url(router: Router) -> str:
    """The router's OpenAI-compatible base URL (its HTTP port must be open)."""
    return f"http://127.0.0.1:{router.ports['http']}"


@contextlib.asynccontextmanager
async def running(settings: RouterSettings) -> AsyncIterator[tuple[Router, str]]:
    """Start a router with ``settings`` (an HTTP port among them); yields it and its HTTP
    base URL, and stops it on exit."""
    router = Router(settings)
    await router.start()
    try:
        yield router, http_url(router)
    finally:
        await router.stop()

"""Stopping background tasks without ever hanging.

Every service loop of the router (KV-event subscribers, scrapers, the budget pump, config
watchers) is stopped the same way: cancel it and wait a *bounded* time for it to end. A task can
outlive its cancellation — Python 3.11's ``asyncio.wait_for`` returns the inner result instead of
raising ``CancelledError`` when the awaited future finished in the same loop iteration as the
cancel (CPython gh-86296), and a loop around it then simply goes on — so shutdown paths must
never ``await task`` unbounded. A task still running after the bound is logged and left behind:
a router that is shutting down returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("kvroute.router.tasks")

DEFAULT_STOP_TIMEOUT_S = 1.0


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, what: str,
                          timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
    """Cancel ``tasks`` and wait at most ``timeout_s`` for them to end.

    Returns True when every task ended. Exceptions of the ended tasks are retrieved (logged, not
    raised): a stopping component has no caller left to act on them. Cancelling the caller while
    it waits propagates as usual.
    """
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, still_running = await asyncio.wait(pending, timeout=timeout_s)
    else:
        still_running = set()
    for task in pending:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("%s: a task failed while stopping: %r", what, task.exception())
    if still_running:
        log.error("%s: %d task(s) still running %.1fs after cancellation; leaving them behind",
                  what, len(still_running), timeout_s)
        return False
    return True


__all__ = ["DEFAULT_STOP_TIMEOUT_S", "cancel_and_wait"]

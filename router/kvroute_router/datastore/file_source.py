"""Embedded mode: the datastore fed from manifest files (InferencePool and RoutePolicy; External
pools list their endpoints), reloaded when a file changes.

The files are polled (mtime, size) every ``poll_interval_s``; a change reloads and validates all
of them with :func:`kvroute_api.manifests.load_objects` and swaps the datastore's content in one
step, so requests in flight keep their decisions and new ones see the new config. An invalid
edit is logged and ignored: the router keeps serving the last good config.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.manifests import load_objects
from kvroute_api.route_policy import RoutePolicy

from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Stamp = tuple[tuple[str, int, int], ...]


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir()
                                if p.suffix in (".yaml", ".yml", ".json") and p.is_file()))
        else:
            files.append(path)
    return files


def _stamp(paths: Sequence[Path]) -> Stamp:
    entries = []
    for path in _expand(paths):
        try:
            st = path.stat()
            entries.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            entries.append((str(path), -1, -1))
    return tuple(entries)


def load_config(datastore: Datastore, paths: Sequence[Path]) -> tuple[int, int]:
    """Load the files into the datastore; returns (pools, policies). Raises ValueError on
    invalid manifests (the datastore is left unchanged)."""
    objects = load_objects(_expand(paths))
    pools = [o for o in objects if isinstance(o, InferencePool)]
    policies = [o for o in objects if isinstance(o, RoutePolicy)]
    managed = [p.metadata.name for p in pools
               if p.spec.mode == "Managed" or not p.spec.endpoints]
    if managed:
        log.warning("pools %s have no static endpoints; embedded mode only serves External "
                    "pools with spec.endpoints", ", ".join(managed))
    datastore.replace(pools, policies, [o for o in objects if isinstance(o, CacheTier)])
    return len(pools), len(policies)


class ConfigFileSource:
    """Loads the config files and reloads them on change."""

    def __init__(self, datastore: Datastore, paths: Sequence[Path],
                 poll_interval_s: float = 1.0) -> None:
        self.datastore = datastore
        self.paths = list(paths)
        self.poll_interval_s = poll_interval_s
        self._stamp: Stamp = ()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    def load(self) -> None:
        """First load; raises ValueError if the config is invalid."""
        self._stamp = _stamp(self.paths)
        pools, policies = load_config(self.datastore, self.paths)
        log.info("loaded %d pool(s) and %d route policy(ies) from %s", pools, policies,
                 ", ".join(map(str, self.paths)))

    def check(self) -> bool:
        """Reload if any file changed; returns whether a reload happened."""
        stamp = _stamp(self.paths)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            pools, policies = load_config(self.datastore, self.paths)
        except (ValueError, OSError) as exc:
            log.error("config change ignored, keeping the previous config: %s", exc)
            return False
        self.reloads += 1
        log.info("reloaded config: %d pool(s), %d route policy(ies)", pools, policies)
        return True

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="config-watch")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], what="config watch")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self.check()

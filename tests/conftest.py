"""Shared pytest configuration: paths, the guard that keeps cluster tests opt-in, and the real
vLLM-CPU engines shared by every tier that needs them (e2e, envoy).

``engine_fleet`` is session-scoped and lives here, above the tiers, so the suite pays the ~90 s
engine start-up once however many tiers use it. Tests must not assume an empty cache: use
prompts unique to the test (``unique_prompt``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

REPO_ROOT = Path(__file__).resolve().parents[1]

BOTH_LOOPS_TIERS = frozenset({"grpc", "loopback"})
"""Tiers whose async tests run on both event loops ``kvroute router --event-loop`` offers."""


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on uvloop, the loop the router runs on by default; the tiers with real
    HTTP and gRPC servers (``BOTH_LOOPS_TIERS``) on the standard library's loop as well, the
    ``--event-loop asyncio`` fallback."""
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "uvloop": uvloop.new_event_loop}
    tier = item.path.relative_to(REPO_ROOT / "tests").parts[0]
    if tier in BOTH_LOOPS_TIERS:
        loops["asyncio"] = asyncio.new_event_loop
    return loops


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real ``redis-server`` on loopback for the session (budget meters, the response
    cache, replica sync); its port."""
    from kvroute_cli.localredis import RedisStartError, start_redis

    try:
        process, port = start_redis(tmp_path_factory.mktemp("redis"))
    except RedisStartError as exc:
        pytest.fail(str(exc))
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def engine_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``KVROUTE_E2E_ENGINES`` (default 2) real engines, started once per session; or, with
    ``KVROUTE_E2E_ENGINES_RUNNING=<workdir of kvroute engines>``, the engines that
    ``kvroute engines --workdir <it>`` already runs (iterating on a test without paying the
    start-up each time)."""
    from kvroute_cli.localengines import LocalEngineFleet

    running = os.environ.get("KVROUTE_E2E_ENGINES_RUNNING")
    if running:
        yield _running_fleet(Path(running))
        return
    count = int(os.environ.get("KVROUTE_E2E_ENGINES", "2"))
    # Bounded well inside the 600 s test timeout: a start that hangs fails, saying which engine.
    # On a crowded machine raise both (KVROUTE_E2E_STARTUP_S and pytest's --timeout).
    fleet = LocalEngineFleet(count=count, workdir=Path(tmp_path_factory.mktemp("engines")),
                             startup_timeout_s=float(os.environ.get("KVROUTE_E2E_STARTUP_S",
                                                                    "300")))
    fleet.start(progress=True)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def unique_prompt() -> str:
    """A prefix no other test uses, so cache effects are this test's own."""
    return f"[{uuid.uuid4().hex}] "


def _running_fleet(workdir: Path) -> Any:
    """A stand-in for a started LocalEngineFleet: the engines listed in the pool manifest
    ``kvroute engines`` printed (its output saved as ``<workdir>/out.log``)."""
    from types import SimpleNamespace

    import yaml

    text = (workdir / "out.log").read_text()
    pool = yaml.safe_load(text[text.index("apiVersion"):])
    engines = [SimpleNamespace(address=e["address"], url=f"http://{e['address']}")
               for e in pool["spec"]["endpoints"]]
    return SimpleNamespace(engines=engines, model_name=pool["spec"]["model"]["name"],
                           block_size=pool["spec"]["engine"]["blockSize"])

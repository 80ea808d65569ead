"""Real vLLM-CPU engines for end-to-end tests.

``engine_fleet`` is session-scoped: the suite pays the ~90 s engine start-up once, and every e2e
test (router, KV events, budgets, …) shares the same engines. Tests must not assume an empty
cache: use prompts unique to the test (``unique_prompt``).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvroute_cli.localengines import LocalEngineFleet

HERE = str(Path(__file__).parent)
if HERE not in sys.path:  # the loopback tests share test_router_loopback's FakeEngine
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def engine_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngineFleet]:
    count = int(os.environ.get("KVROUTE_E2E_ENGINES", "2"))
    # Bounded well inside the 600 s test timeout: a start that hangs fails, saying which engine.
    # KVROUTE_E2E_STARTUP_S raises the bound on a machine whose cores are shared (then raise
    # pytest's --timeout too).
    fleet = LocalEngineFleet(count=count, workdir=Path(tmp_path_factory.mktemp("engines")),
                             startup_timeout_s=float(
                                 os.environ.get("KVROUTE_E2E_STARTUP_S", "300")))
    fleet.start(progress=True)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def unique_prompt() -> str:
    """A prefix no other test uses, so cache effects are this test's own."""
    return f"[{uuid.uuid4().hex}] "

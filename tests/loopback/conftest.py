"""Fixtures of the loopback tier's tests that run real routers in front of emulated engines:
the byte-level test model (built once per session) and a two-engine emulated fleet on the
test's event loop (``tests/emulated.py``). A module that needs another fleet shape overrides
``fleet``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kvroute_cli.testmodel import build_test_model
from kvroute_emulator.fleet import EmulatedFleet

from tests.emulated import MODEL, emulated_fleet


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("model"), MODEL)


@pytest.fixture
async def fleet(model_dir: Path) -> AsyncIterator[EmulatedFleet]:
    async with emulated_fleet(model_dir) as f:
        yield f

"""Shared pytest configuration: paths, and the guard that keeps cluster tests opt-in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The emulator package from this checkout even where an older editable install predates it.
if str(REPO_ROOT / "emulator") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "emulator"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return REPO_ROOT / "examples"

"""The committed protobuf code is exactly what router/proto/generate.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("proto_generate",
                                                  REPO / "router" / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.generate(tmp_path)
    assert written
    for fresh in written:
        committed = REPO / "router" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing; run python router/proto/generate.py"
        assert fresh.read_text() == committed.read_text(), (
            f"{committed} is stale; run python router/proto/generate.py")

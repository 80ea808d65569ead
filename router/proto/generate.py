"""Regenerates the committed Python code of kvroute's protos (``kvroute_router/proto_gen``).

Run from the repository root: ``python router/proto/generate.py`` (writes in place) or
``python router/proto/generate.py OUTDIR`` (writes ``OUTDIR/kvroute_router/proto_gen``; the
drift test compares that with the committed files). Only message code and ``.pyi`` stubs are
generated: the servers register typed generic handlers, so no untyped ``*_pb2_grpc.py`` is
needed. protoc's ``.pyi`` uses bare ``Mapping`` in constructors, which mypy --strict rejects, so
one directive line is prepended to each stub.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "router" / "proto" / "kvroute" / "v1"
PACKAGE = "kvroute_router/proto_gen"
STUB_HEADER = '# mypy: disable-error-code="type-arg"\n'


def generate(out_root: Path) -> list[Path]:
    """Generate into ``out_root/kvroute_router/proto_gen``; returns the files written."""
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in protos:
        code = protoc.main(["grpc_tools.protoc", f"-I{PACKAGE}={PROTO_DIR}", f"-I{include}",
                            f"--python_out={out_root}", f"--pyi_out={out_root}", str(proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
    written = []
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi"):
            path = out_root / PACKAGE / f"{proto.stem}{suffix}"
            if suffix == "_pb2.pyi":
                path.write_text(STUB_HEADER + path.read_text())
            written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "router"
    for path in generate(target):
        print(path)

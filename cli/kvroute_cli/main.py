"""``kvroute`` console script: one entry point, one sub-command module per job.

Every module ``kvroute_cli.cmd_*`` defines ``register(subparsers)``, which adds its
sub-command(s) and sets ``func`` to a handler returning the exit code. Modules are found by name,
so adding a command never touches this file. Handlers import heavy dependencies lazily, so
``kvroute validate`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import kvroute_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute",
        description="KV-cache-aware routing and a Kubernetes operator for vLLM fleets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(kvroute_cli.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"kvroute_cli.{info.name}")
            module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

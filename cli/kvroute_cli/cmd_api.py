"""``kvroute crds`` and ``kvroute validate``: the API's CRDs and offline manifest validation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvroute_api import crdgen


def _crds(args: argparse.Namespace) -> int:
    if args.write is None and not args.check:
        sys.stdout.write(crdgen.all_crds_yaml())
        return 0
    directory = Path(args.write or args.check_dir)
    stale = []
    for kind in crdgen.KINDS:
        path = directory / crdgen.crd_filename(kind)
        text = crdgen.crd_yaml(kind)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("out of date (run `kvroute crds --write crds/`): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kvroute_api.manifests import validate_paths

    objects, problems = validate_paths(Path(f) for f in args.filename)
    for problem in problems:
        print(problem.render(), file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {len(args.filename)} file(s)", file=sys.stderr)
        return 1
    for obj in objects:
        print(f"{obj.KIND}/{obj.metadata.name}: valid")
    return 0


def register(sub: Any) -> None:
    crds = sub.add_parser("crds", help="print (or write, or check) the CRD manifests")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR")
    crds.add_argument("--check", action="store_true",
                      help="exit 1 if the files in --check-dir differ from the models")
    crds.add_argument("--check-dir", default="crds", help="directory for --check")
    crds.set_defaults(func=_crds)

    validate = sub.add_parser("validate", help="validate kvroute manifests offline")
    validate.add_argument("-f", "--filename", action="append", required=True,
                          help="manifest file (multi-document YAML); repeatable")
    validate.set_defaults(func=_validate)

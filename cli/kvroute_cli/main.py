"""``kvroute`` console script: one entry point, one sub-command per job.

Sub-commands import what they need lazily, so ``kvroute validate`` starts fast and does not load
the router or the operator.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvroute_api import crdgen


def _cmd_crds(args: argparse.Namespace) -> int:
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


def _cmd_validate(args: argparse.Namespace) -> int:
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


def _cmd_engines(args: argparse.Namespace) -> int:
    import yaml

    from kvroute_cli.localengines import LocalEngineFleet

    fleet = LocalEngineFleet(count=args.count, workdir=Path(args.workdir))
    fleet.start(progress=True)
    pool = {
        "apiVersion": "kvroute.io/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "local"},
        "spec": {
            "mode": "External",
            "model": {"name": fleet.model_name},
            "engine": {"blockSize": fleet.block_size},
            "resources": {"gpus": 0},
            "endpoints": [{
                "name": f"engine-{e.index}",
                "address": e.address,
                "kvEventsEndpoint": e.kv_events_endpoint,
                "kvEventsReplayEndpoint": e.replay_endpoint,
            } for e in fleet.engines],
        },
    }
    print("# Local engines are up; an External InferencePool for them:")
    print(yaml.safe_dump(pool, sort_keys=False), flush=True)
    try:
        deadline = time.monotonic() + args.serve_seconds if args.serve_seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute",
        description="KV-cache-aware routing and a Kubernetes operator for vLLM fleets.")
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="print (or write, or check) the CRD manifests")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR")
    crds.add_argument("--check", action="store_true",
                      help="exit 1 if the files in --check-dir differ from the models")
    crds.add_argument("--check-dir", default="crds", help="directory for --check")
    crds.set_defaults(func=_cmd_crds)

    validate = sub.add_parser("validate", help="validate kvroute manifests offline")
    validate.add_argument("-f", "--filename", action="append", required=True,
                          help="manifest file (multi-document YAML); repeatable")
    validate.set_defaults(func=_cmd_validate)

    engines = sub.add_parser("engines", help="run local vLLM-CPU engines and print a pool")
    engines.add_argument("--count", type=int, default=2, help="number of engines")
    engines.add_argument("--workdir", default=".kvroute/engines",
                         help="folder for the model files and engine logs")
    engines.add_argument("--serve-seconds", type=float, default=0,
                         help="stop after this many seconds (0: until Ctrl-C)")
    engines.set_defaults(func=_cmd_engines)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

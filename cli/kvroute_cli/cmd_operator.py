"""``kvroute operator`` (run the kopf operator) and ``kvroute render`` (print the child
manifests the operator would apply, offline)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _render(args: argparse.Namespace) -> int:
    from kvroute_api.manifests import load_objects
    from kvroute_operator.render import rendered_children, to_yaml

    try:
        objects = load_objects(Path(f) for f in args.filename)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(rendered_children(objects)))
    return 0


def _operator(args: argparse.Namespace) -> int:
    from kvroute_operator.runner import OperatorConfig, run_operator

    config = OperatorConfig(prometheus_url=args.prometheus_url,
                            resync_seconds=args.resync_seconds)
    run_operator(config, namespaces=args.namespace or [],
                 liveness_port=args.liveness_port, verbose=args.verbose)
    return 0


def register(sub: Any) -> None:
    render = sub.add_parser("render", help="print the manifests the operator would apply")
    render.add_argument("-f", "--filename", action="append", required=True,
                        help="kvroute manifest file (multi-document YAML); repeatable")
    render.set_defaults(func=_render)

    op = sub.add_parser("operator", help="run the kvroute Kubernetes operator")
    op.add_argument("-n", "--namespace", action="append", metavar="NS",
                    help="namespace to serve (repeatable; globs allowed); all when omitted")
    op.add_argument("--prometheus-url", default=None,
                    help="Prometheus base URL for autoscaling and budget status")
    op.add_argument("--resync-seconds", type=float, default=15.0,
                    help="how often every object is re-reconciled (drift repair, status)")
    op.add_argument("--liveness-port", type=int, default=8081,
                    help="port of the /healthz liveness endpoint (0 disables it)")
    op.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    op.set_defaults(func=_operator)

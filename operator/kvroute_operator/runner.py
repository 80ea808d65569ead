"""Running the operator in-process (``kvroute operator``): a fresh kopf registry with the
operator's handlers and kopf's client-based login, standalone, cluster-wide or namespaced,
with the liveness endpoint on port 8081."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import kopf

from kvroute_operator.context import OperatorConfig
from kvroute_operator.handlers import register_handlers

__all__ = ["OperatorConfig", "build_registry", "run_operator"]


def build_registry(config: OperatorConfig, *, login: bool = True) -> kopf.OperatorRegistry:
    """A registry with every handler; ``login`` adds kopf's kubeconfig/in-cluster login."""
    registry = kopf.OperatorRegistry()
    if login:
        kopf.on.login(registry=registry)(kopf.login_via_client)
    register_handlers(registry, config.resync_seconds)
    return registry


def run_operator(config: OperatorConfig, namespaces: Sequence[str] = (),
                 liveness_port: int = 8081, verbose: bool = False) -> None:
    """Block running the operator until it is signalled to stop."""
    kopf.configure(verbose=verbose)
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    asyncio.run(kopf.operator(
        registry=build_registry(config), standalone=True, clusterwide=not namespaces,
        namespaces=list(namespaces), liveness_endpoint=liveness,
        memo=kopf.Memo(config=config)))

"""Offline rendering (``kvroute render``): the child manifests the operator would apply for a set
of kvroute objects, produced by the same builders, with no cluster.

CacheTier references are resolved among the given objects (same namespace); ownerReferences are
left out because they need the UID the API server assigns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml
from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import ResourceBase

from kvroute_operator.builders import build_children


def rendered_children(objects: Iterable[ResourceBase]) -> list[dict[str, Any]]:
    """Children of every Managed pool among ``objects``, in input order."""
    items = list(objects)
    tiers = {(t.metadata.namespace, t.metadata.name): t for t in items
             if isinstance(t, CacheTier)}
    children: list[dict[str, Any]] = []
    for obj in items:
        if isinstance(obj, InferencePool):
            ref = obj.spec.cache_tier_ref
            tier = tiers.get((obj.metadata.namespace, ref.name)) if ref else None
            children += build_children(obj, tier)
    return children


def to_yaml(manifests: Iterable[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in builder order."""
    return yaml.safe_dump_all(list(manifests), sort_keys=False, default_flow_style=False,
                              explicit_start=True, width=100)

"""The Kubernetes permissions the router's watch mode needs (``--kubernetes``), as PolicyRule
dicts; the Helm chart renders its Role/ClusterRole from this list (and its tests import it)."""

from __future__ import annotations

ROUTER_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kvroute.io"], "resources": ["inferencepools", "routepolicies"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
]

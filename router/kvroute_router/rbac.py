"""The Kubernetes permissions the router's watch mode needs (``--kubernetes``), as PolicyRule
dicts; the Helm chart renders its Role/ClusterRole from this list (and its tests import it)."""

from __future__ import annotations

ROUTER_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kvroute.io"], "resources": ["inferencepools", "routepolicies", "cachetiers"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
]
"""Granted to the router everywhere it watches. Secrets are not among them: see below."""

PEER_COUNT_RULE: dict[str, list[str]] = {
    "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}
"""``--budget-peer-service``: the router counts the ready endpoints of its own Service to share
budget limits among its replicas; the chart grants this in the release namespace only."""

API_KEY_SECRET_RULE: dict[str, list[str]] = {
    "apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
"""API keys of ``tenancy.source: APIKey`` policies: the router reads each Secret a policy names
(``apiKeysSecretRef``) by name, never lists or watches Secrets. The chart grants this rule only
for the Secrets ``router.apiKeySecrets`` names (``resourceNames``, a Role in each Secret's
namespace): with none named the router cannot read any Secret (docs/security.md)."""

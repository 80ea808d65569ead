"""The Kubernetes permissions the router's watch mode needs (``--kubernetes``), as PolicyRule
dicts; the Helm chart renders its Role/ClusterRole from this list (and its tests import it)."""

from __future__ import annotations

ROUTER_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kvroute.io"], "resources": ["inferencepools", "routepolicies", "cachetiers"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # API keys of `tenancy.source: APIKey` policies (the Secret named by apiKeysSecretRef);
    # only referenced Secrets are kept, as SHA-256 digests. Namespaced installs grant this in
    # the router's namespace only.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
]

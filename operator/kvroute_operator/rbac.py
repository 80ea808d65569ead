"""The least Kubernetes RBAC the operator needs, listed once.

The Helm chart renders its ClusterRole (or Role, in namespaced installs) from
:data:`OPERATOR_RULES`; ``docs/operator.md`` explains each rule. Every verb here is used by the
operator's code: the kopf watches (get/list/watch), the server-side applies of children
(create/patch), status writes, deletion of children that a spec no longer asks for, the
autoscaler's writes of ``spec.replicas``, and the Events it posts. Peering is disabled
(standalone mode), so no kopf.dev resources are needed.
"""

from __future__ import annotations

from typing import Final

READ: Final = ["get", "list", "watch"]

OPERATOR_RULES: Final[list[dict[str, list[str]]]] = [
    # The three kinds: watched, patched (finalizers, kopf's progress annotations, spec.replicas
    # written by the autoscaler) and their status written.
    {
        "apiGroups": ["kvroute.io"],
        "resources": ["inferencepools", "routepolicies", "cachetiers"],
        "verbs": [*READ, "patch", "update"],
    },
    {
        "apiGroups": ["kvroute.io"],
        "resources": ["inferencepools/status", "routepolicies/status", "cachetiers/status"],
        "verbs": ["get", "patch", "update"],
    },
    {
        "apiGroups": ["kvroute.io"],
        "resources": ["inferencepools/scale"],
        "verbs": ["get", "patch", "update"],
    },
    # Children of Managed pools, written by server-side apply and removed on cleanup.
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": [*READ, "create", "patch", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": [*READ, "create", "patch", "delete"],
    },
    {
        "apiGroups": ["policy"],
        "resources": ["poddisruptionbudgets"],
        "verbs": [*READ, "create", "patch", "delete"],
    },
    # Pods are read to report endpoints and ready counts (Managed and External pools).
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": READ,
    },
    # Kubernetes Events: kopf posts through the core v1 API.
    {
        "apiGroups": [""],
        "resources": ["events"],
        "verbs": ["create", "patch"],
    },
    # kopf scans CRDs and namespaces to find what to watch (cluster-wide mode, globs).
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    {
        "apiGroups": [""],
        "resources": ["namespaces"],
        "verbs": ["list", "watch"],
    },
]

__all__ = ["OPERATOR_RULES"]

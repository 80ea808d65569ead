"""RBAC: the chart grants exactly the rules the operator and router declare in Python
(kvroute_operator.rbac.OPERATOR_RULES, kvroute_router.rbac.ROUTER_RULES, listed once there and
copied into files/rbac/), in both scopes; namespaced installs get no cluster-wide write access."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvroute_router.rbac import API_KEY_SECRET_RULE

CHART = Path(__file__).resolve().parents[2] / "charts" / "kvroute"
READ = {"get", "list", "watch"}
SOURCES = {"operator": ("kvroute_operator.rbac", "OPERATOR_RULES"),
           "router": ("kvroute_router.rbac", "ROUTER_RULES")}


def declared_rules(component: str) -> list[dict[str, list[str]]]:
    module_name, attr = SOURCES[component]
    module = importlib.import_module(module_name)
    rules: list[dict[str, list[str]]] = getattr(module, attr)
    return rules


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) a list of PolicyRules allows."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule["verbs"]}


EXTRA_ROLES = ("-peers", "-api-key-secrets")
"""The router's Roles beyond its watch rules, checked by their own tests: counting its peers
(PEER_COUNT_RULE, release namespace) and reading named API-key Secrets."""


def bound_rules(manifests: Any, component: str, extras: bool = False
                ) -> dict[str, list[tuple[str, list[Any]]]]:
    """{"cluster": [(name, rules)], "<ns>": [(name, rules)]} of the roles bound to the
    component's ServiceAccount (without EXTRA_ROLES unless ``extras``)."""
    sa = f"kvroute-{component}"
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d["rules"]
             for d in manifests if d["kind"] in {"ClusterRole", "Role"}}
    out: dict[str, list[tuple[str, list[Any]]]] = {}
    for b in manifests:
        if b["kind"] not in {"ClusterRoleBinding", "RoleBinding"}:
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa
                   and s["namespace"] == "kvroute-system" for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        if not extras and ref["name"].endswith(EXTRA_ROLES):
            continue
        ns = b["metadata"].get("namespace")
        key = (ref["kind"], None if ref["kind"] == "ClusterRole" else ns, ref["name"])
        assert key in roles, f"{b['kind']} {b['metadata']['name']} binds missing {key}"
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else ns
        out.setdefault(scope, []).append((ref["name"], roles[key]))
    return out


@pytest.mark.parametrize("component", sorted(SOURCES))
def test_rules_file_is_the_declared_list(component: str) -> None:
    declared = declared_rules(component)
    copy = yaml.safe_load((CHART / "files" / "rbac" / f"{component}.yaml").read_text("utf-8"))
    assert copy == declared, (
        f"charts/kvroute/files/rbac/{component}.yaml differs from {'.'.join(SOURCES[component])}"
        f"; its content should be:\n"
        + yaml.safe_dump(declared, default_flow_style=None, sort_keys=False, width=100))


@pytest.mark.parametrize("component", sorted(SOURCES))
def test_cluster_mode_grants_exactly_the_declared_rules(defaults: Any, component: str) -> None:
    declared = grants(declared_rules(component))
    bound = bound_rules(defaults, component)
    assert set(bound) == {"cluster"}, f"cluster mode binds namespaced roles: {sorted(bound)}"
    granted = grants([r for _, rules in bound["cluster"] for r in rules])
    assert declared <= granted, f"missing: {sorted(declared - granted)}"
    assert granted <= declared, f"more than the {component} declares: {sorted(granted - declared)}"


@pytest.mark.parametrize("component", sorted(SOURCES))
def test_namespaced_mode_grants_the_rules_in_the_namespace_only(render: Any, ci_values: Any,
                                                               component: str) -> None:
    declared = grants(declared_rules(component))
    bound = bound_rules(render(ci_values("namespaced")), component)
    assert set(bound) <= {"cluster", "inference"}, sorted(bound)
    cluster = grants([r for _, rules in bound.get("cluster", []) for r in rules])
    in_ns = grants([r for _, rules in bound["inference"] for r in rules])
    # Cluster-wide: read-only, and only cluster-scoped resources (CRDs, namespaces).
    assert {v for _, _, v in cluster} <= READ, f"cluster-wide writes: {sorted(cluster)}"
    assert {r for _, r, _ in cluster} <= {"customresourcedefinitions", "namespaces"}, cluster
    assert declared <= cluster | in_ns, f"missing: {sorted(declared - (cluster | in_ns))}"
    assert cluster | in_ns <= declared


def test_namespaced_mode_has_no_cluster_access_to_workloads(render: Any, ci_values: Any) -> None:
    manifests = render(ci_values("namespaced"))
    for role in manifests.kind("ClusterRole"):
        for group, resource, verb in grants(role["rules"]):
            assert verb in READ, f"{role['metadata']['name']}: {verb} {group}/{resource}"
            assert resource not in {"pods", "deployments", "services", "poddisruptionbudgets",
                                    "secrets", "inferencepools", "routepolicies", "cachetiers"}, (
                f"{role['metadata']['name']} reads {resource} cluster-wide")
    assert {r["metadata"]["namespace"] for r in manifests.kind("Role")
            if not r["metadata"]["name"].endswith(EXTRA_ROLES)} == {"inference"}


def test_operator_across_namespaces_without_router(render: Any,
                                                   helm_error: type[Exception]) -> None:
    """The operator watches several namespaces (one Role each); the router watches one, so a
    multi-namespace release must leave the router to per-namespace releases."""
    ns = ["team-a", "team-b"]
    with pytest.raises(helm_error, match="the router watches one"):
        render(sets={"watchNamespaces": ns})
    manifests = render(sets={"watchNamespaces": ns, "router.enabled": False})
    assert sorted(r["metadata"]["namespace"] for r in manifests.kind("Role")) == ns
    args = manifests.deployment("operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={n}" for n in ns]


def test_router_watches_its_namespace(render: Any, ci_values: Any) -> None:
    dep = render(ci_values("namespaced")).deployment("router")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=inference"]


def test_rbac_can_be_left_to_the_user(render: Any) -> None:
    m = render(sets={"operator.rbac.create": False, "router.rbac.create": False})
    assert not [d for d in m if d["kind"].endswith(("Role", "RoleBinding"))]


def test_no_secret_access_unless_api_key_secrets_are_named(defaults: Any, render: Any,
                                                           ci_values: Any) -> None:
    """Least privilege (docs/security.md): the router never lists or watches Secrets, and
    reads only the API-key Secrets named in router.apiKeySecrets."""
    for manifests in (defaults, render(ci_values("namespaced"))):
        bound = bound_rules(manifests, "router", extras=True)
        assert not [r for roles in bound.values() for _, rules in roles for r in rules
                    if "secrets" in r["resources"]]
    m = render(sets={"router.apiKeySecrets": [{"name": "chat-keys"},
                                              {"name": "b-keys", "namespace": "team-b"},
                                              {"name": "chat-keys"}]})
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in m.kind("Role")
             if r["metadata"]["name"].endswith("-api-key-secrets")}
    assert set(roles) == {("kvroute-system", "kvroute-router-api-key-secrets"),
                          ("team-b", "kvroute-router-api-key-secrets")}
    assert roles[("kvroute-system", "kvroute-router-api-key-secrets")]["rules"] == [
        {**API_KEY_SECRET_RULE, "resourceNames": ["chat-keys"]}]
    assert API_KEY_SECRET_RULE == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    bound = bound_rules(m, "router", extras=True)
    assert [name for name, _ in bound["team-b"]] == ["kvroute-router-api-key-secrets"]
    # CacheTiers' redis.urlSecretRef Secrets join the same Role of their namespace.
    m = render(sets={"router.apiKeySecrets": [{"name": "chat-keys"}],
                     "router.cacheTierSecrets": [{"name": "redis-url"},
                                                 {"name": "c-redis", "namespace": "team-c"}]})
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in m.kind("Role")
             if r["metadata"]["name"].endswith("-api-key-secrets")}
    assert roles[("kvroute-system", "kvroute-router-api-key-secrets")]["rules"] == [
        {**API_KEY_SECRET_RULE, "resourceNames": ["chat-keys", "redis-url"]}]
    assert roles[("team-c", "kvroute-router-api-key-secrets")]["rules"] == [
        {**API_KEY_SECRET_RULE, "resourceNames": ["c-redis"]}]
    assert [name for name, _ in bound_rules(m, "router", extras=True)["team-c"]] == [
        "kvroute-router-api-key-secrets"]
    # Namespaced installs: the watched namespace by default.
    m = render(ci_values("namespaced"), sets={"router.apiKeySecrets": [{"name": "k"}]})
    [role] = [r for r in m.kind("Role") if r["metadata"]["name"].endswith("api-key-secrets")]
    assert role["metadata"]["namespace"] == "inference"


def test_the_router_counts_its_peers_in_its_own_namespace(defaults: Any, render: Any,
                                                          ci_values: Any) -> None:
    """Budgets without Redis are shared by the ready router replicas (docs/security.md): the
    router lists its own Service's EndpointSlices, in the release namespace only."""
    from kvroute_router.rbac import PEER_COUNT_RULE

    for manifests in (defaults, render(ci_values("namespaced"))):
        role = manifests.one("Role", "kvroute-router-peers")
        assert role["metadata"]["namespace"] == "kvroute-system"
        assert role["rules"] == [PEER_COUNT_RULE]
        bound = bound_rules(manifests, "router", extras=True)
        assert "kvroute-router-peers" in [n for n, _ in bound["kvroute-system"]]
        args = manifests.deployment("router")["spec"]["template"]["spec"]["containers"][0][
            "args"]
        assert "--budget-peer-service=kvroute-router" in args
        assert manifests.one("Service", "kvroute-router")

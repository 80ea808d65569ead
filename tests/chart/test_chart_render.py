"""`helm lint` and `helm template` over every value file in charts/kvroute/ci/, the output
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
fail) and checked for what an SRE relies on: hardened security contexts, probes, ports,
replica and rollout settings."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

# Kinds whose schemas come from CRDs that kubernetes-validate does not ship; they are checked
# structurally in test_chart_monitoring.py / test_chart_crds.py instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("kvroute.io/v1alpha1", "InferencePool"),
    ("kvroute.io/v1alpha1", "RoutePolicy"),
    ("kvroute.io/v1alpha1", "CacheTier"),
}
WORKLOAD_KINDS = {"Deployment"}


def test_lint(helm: Any, ci_file: Path) -> None:
    proc = helm.lint(ci_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_renders_and_validates(helm: Any, ci_file: Path, kube_version: str) -> None:
    manifests = helm.template(ci_file, kube_version=kube_version)
    assert manifests.docs, "nothing rendered"
    for doc in manifests:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, kube_version, strict=True)


def test_validation_is_live(defaults: Any) -> None:
    """The validator really rejects a broken object (so a passing run means something)."""
    broken = yaml.safe_load(yaml.safe_dump(defaults.deployment("router")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)


def _pod_specs(manifests: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in manifests if d["kind"] in WORKLOAD_KINDS]


def test_every_container_is_hardened(helm: Any, ci_file: Path) -> None:
    pods = _pod_specs(helm.template(ci_file))
    assert pods
    for name, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert not sc.get("privileged", False), where
            # A read-only root needs a writable /tmp for Python and Envoy.
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where
            assert c.get("resources", {}).get("requests"), f"{where} has no resource requests"
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name


def test_every_container_has_probes(helm: Any, ci_file: Path) -> None:
    for name, pod in _pod_specs(helm.template(ci_file)):
        ports_by_name = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        for c in pod["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{name}/{c['name']} lacks {probe}"
                port = c[probe]["httpGet"]["port"]
                assert port in ports_by_name, f"{name}/{c['name']} {probe} port {port!r}"


def test_operator_deployment(defaults: Any) -> None:
    dep = defaults.deployment("operator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["kvroute"]
    assert c["args"][0] == "operator"
    assert "--liveness-port=8081" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    # No Prometheus URL by default (the flag is optional); cluster-wide (no --namespace).
    assert not any(a.startswith(("--prometheus-url", "--namespace")) for a in c["args"])


def test_operator_flags_follow_values(render: Any, ci_values: Any) -> None:
    dep = render(ci_values("namespaced")).deployment("operator")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--prometheus-url=http://prometheus-operated.monitoring.svc:9090" in args
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=inference"]


def test_router_deployment_and_service(defaults: Any) -> None:
    dep = defaults.deployment("router")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"][:2] == ["router", "--kubernetes"]
    for flag in ("--port=8080", "--ext-proc-port=9002", "--grpc-port=9003",
                 "--metrics-port=9090"):
        assert flag in c["args"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # On SIGTERM: 5 s not ready while still serving, then in-flight streams get the pod's
    # grace (60 s) minus that and a 10 s margin to finish.
    assert pod["terminationGracePeriodSeconds"] == 60
    assert "--shutdown-delay-seconds=5" in c["args"]
    assert "--shutdown-grace-seconds=45" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "grpc-ext-proc": 9002, "grpc": 9003, "metrics": 9090}
    svc = defaults.one("Service", "kvroute-router")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    # Spread over zones and nodes, counting only this release's router pods.
    spread = pod["topologySpreadConstraints"]
    assert [t["topologyKey"] for t in spread] == ["topology.kubernetes.io/zone",
                                                   "kubernetes.io/hostname"]
    for t in spread:
        assert t["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = defaults.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert not defaults.kind("HorizontalPodAutoscaler")


def test_ha_router(render: Any, ci_values: Any) -> None:
    m = render(ci_values("ha"))
    dep = m.deployment("router")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = m.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "kvroute-router"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert m.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == "25%"
    pod = dep["spec"]["template"]["spec"]
    assert [t["whenUnsatisfiable"] for t in pod["topologySpreadConstraints"]] == ["DoNotSchedule"]
    images = {c["image"] for c in pod["containers"]}
    assert f"ghcr.io/kvroute/kvroute@sha256:{'0' * 64}" in images
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert not m.kind("CustomResourceDefinition")


def test_replica_sync_url_comes_from_a_secret(render: Any, defaults: Any) -> None:
    def env(m: Any) -> dict[str, Any]:
        (c,) = [c for c in m.deployment("router")["spec"]["template"]["spec"]["containers"]
                if c["name"] == "router"]
        return {e["name"]: e for e in c["env"]}

    assert "KVROUTE_REPLICA_SYNC_REDIS_URL" not in env(defaults)
    m = render(sets={"router.replicaSync.redisUrlSecretName": "router-redis"})
    assert env(m)["KVROUTE_REPLICA_SYNC_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "router-redis", "key": "url"}}


def test_single_router_replica_has_no_pdb(render: Any) -> None:
    """A PDB over one replica would block node drains forever."""
    m = render(sets={"router.replicas": 1})
    assert not m.kind("PodDisruptionBudget")


def test_components_can_be_switched_off(render: Any) -> None:
    m = render(sets={"operator.enabled": False, "crds.enabled": False})
    assert {d["metadata"]["name"] for d in m.kind("Deployment")} == {"kvroute-router"}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/component"] == "router"
               for d in m if d["kind"] in {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"})
    m = render(sets={"router.enabled": False})
    assert {d["metadata"]["name"] for d in m.kind("Deployment")} == {"kvroute-operator"}
    assert not m.kind("Service")


def test_every_object_is_labelled_and_namespaced(helm: Any, ci_file: Path) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for doc in helm.template(ci_file):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "kvroute", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"].get("namespace"), f"{doc['kind']} {doc['metadata']['name']}"


def test_notes_render(helm: Any, chart_dir: Path, ci_file: Path, tmp_path: Path) -> None:
    """NOTES.txt renders and points at what to apply next. `helm template` skips NOTES.txt and
    `helm install --dry-run` needs a cluster, so a copy of the chart carries the notes inside a
    manifest-shaped template that `helm template` does render."""
    chart = tmp_path / "kvroute"
    shutil.copytree(chart_dir, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "kvroute-test.notes" -}}\n' + notes + '\n{{- end -}}\n'
        "apiVersion: v1\nkind: RenderedNotes\nmetadata: {name: notes}\n"
        'notes: {{ include "kvroute-test.notes" . | toJson }}\n', encoding="utf-8")
    proc = helm.run("template", "kvroute", str(chart), "--namespace", "kvroute-system",
                    "-f", str(ci_file), "--show-only", "templates/zz-notes.yaml")
    assert proc.returncode == 0, proc.stderr
    text = yaml.safe_load(proc.stdout)["notes"]
    assert "kubectl apply -f examples/pool-llama-8b.yaml" in text
    assert "port-forward svc/kvroute-router 8080:8080" in text
    for example in re.findall(r"kubectl apply -f (examples/\S+)", text):
        assert (REPO_ROOT / example).is_file(), f"NOTES.txt names missing {example}"

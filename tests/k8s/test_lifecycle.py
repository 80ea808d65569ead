"""Lifecycle of the three kinds under a real kopf operator and the kmock emulator:
create -> children and status; update -> children updated and observedGeneration advanced;
child deleted -> recreated; bad reference -> False condition; delete -> cleanup; operator
restarted -> no duplicates; kubectl-scale path -> Deployment follows."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from kvroute_api import GROUP, VERSION

from tests.k8s.conftest import Cluster, condition, eventually

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(60)]
API = f"{GROUP}/{VERSION}"
CHILDREN = (("apps/v1", "deployments"), ("v1", "services"), ("policy/v1",
                                                             "poddisruptionbudgets"))


def deployment(cluster: Cluster, name: str = "llama-8b") -> Any:
    return cluster.get("apps/v1", "deployments", name)


def vllm_args(dep: dict[str, Any]) -> list[str]:
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert isinstance(args, list)
    return args


async def add_pod(cluster: Cluster, pool: str, index: int, ready: bool) -> None:
    """What the Deployment controller and kubelet would do: a labelled pod with an IP."""
    await cluster.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{pool}-5d8f7c9b-{index:05d}", "labels": {"kvroute.io/pool": pool}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        "status": {"podIP": f"10.0.0.{index + 1}", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]},
    })


async def test_create_update_drift_and_delete(cluster: Cluster, operator: Any,
                                              pool_8b: dict[str, Any],
                                              tier: dict[str, Any]) -> None:
    await operator()
    await cluster.create(tier)
    created = await cluster.create(pool_8b)
    uid = created["metadata"]["uid"]

    # Create -> Deployment, Service, PDB owned by the pool, with the tier's offload flags.
    dep = await eventually(lambda: deployment(cluster), "the Deployment")
    for api_version, plural in CHILDREN:
        child = await eventually(functools.partial(cluster.get, api_version, plural,
                                                   "llama-8b"), f"{plural}")
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert child["metadata"]["labels"]["kvroute.io/pool"] == "llama-8b"
    assert dep["spec"]["replicas"] == 2
    args = vllm_args(dep)
    assert "--enable-prefix-caching" in args and "--kv-offloading-size" in args

    # Status: observedGeneration, selector, conditions with reasons.
    pool = await eventually(lambda: (cluster.pool("llama-8b") or {}).get("status", {})
                            .get("observedGeneration") == 1 and cluster.pool("llama-8b"),
                            "pool status")
    assert pool["status"]["selector"] == "kvroute.io/pool=llama-8b"
    ready = condition(pool, "Ready")
    assert ready and ready["status"] == "False" and ready["reason"] == "NoEngineReady"

    # Engines come up (simulated controller) -> endpoints, ready counts, Ready=True.
    await add_pod(cluster, "llama-8b", 0, ready=True)
    await add_pod(cluster, "llama-8b", 1, ready=False)
    await add_pod(cluster, "other-pool", 2, ready=True)
    # Wait for the reconcile that has seen both pods: an earlier one may already report
    # Ready=True from the first pod alone.
    pool = await eventually(
        lambda: (condition(cluster.pool("llama-8b"), "Ready") or {}).get("status") == "True"
        and (cluster.pool("llama-8b") or {}).get("status", {}).get("replicas") == 2
        and cluster.pool("llama-8b"), "Ready=True with both pods counted")
    status = pool["status"]
    assert status["readyReplicas"] == 1 and status["replicas"] == 2
    assert [e["name"] for e in status["endpoints"]] == ["llama-8b-5d8f7c9b-00000",
                                                        "llama-8b-5d8f7c9b-00001"]
    assert status["endpoints"][0]["address"] == "10.0.0.1:8000"
    assert (condition(pool, "Progressing") or {}).get("status") == "True"

    # Update -> the Deployment follows and observedGeneration advances.
    await cluster.patch(API, "inferencepools", "llama-8b",
                        {"spec": {"engine": {"maxNumSeqs": 64}}})
    await eventually(lambda: "64" in vllm_args(deployment(cluster) or {}), "updated args")
    await eventually(lambda: cluster.pool("llama-8b")["status"]["observedGeneration"] == 2,
                     "observedGeneration 2")

    # Scale subresource (kubectl scale) -> spec.replicas -> Deployment replicas.
    await cluster.patch(API, "inferencepools", "llama-8b", {"spec": {"replicas": 3}},
                        subresource="scale")
    await eventually(lambda: deployment(cluster)["spec"]["replicas"] == 3, "scaled Deployment")

    # Drift: a hand edit is put back; a deleted child is recreated.
    await cluster.patch("apps/v1", "deployments", "llama-8b",
                        {"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 1}}}})
    await eventually(lambda: deployment(cluster)["spec"]["template"]["spec"]
                     ["terminationGracePeriodSeconds"] == 300, "edit reverted")
    await cluster.delete("policy/v1", "poddisruptionbudgets", "llama-8b")
    await eventually(lambda: cluster.get("policy/v1", "poddisruptionbudgets", "llama-8b"),
                     "PDB recreated")

    # Delete -> children removed, the pool released (finalizer gone).
    await cluster.delete(API, "inferencepools", "llama-8b")
    await eventually(lambda: cluster.pool("llama-8b") is None, "pool gone")
    for api_version, plural in CHILDREN:
        await eventually(functools.partial(absent, cluster, api_version, plural, "llama-8b"),
                         f"{plural} deleted")


async def test_missing_references_are_conditions(cluster: Cluster, operator: Any,
                                                 pool_8b: dict[str, Any],
                                                 policy: dict[str, Any],
                                                 tier: dict[str, Any]) -> None:
    await operator()
    await cluster.create(policy)
    pol = await eventually(lambda: condition(cluster.policy("chat"), "ResolvedRefs")
                           and cluster.policy("chat"), "ResolvedRefs")
    refs = condition(pol, "ResolvedRefs")
    assert refs and refs["status"] == "False" and refs["reason"] == "PoolNotFound"
    assert "llama-8b" in refs["message"] and "llama-70b" in refs["message"]
    assert (condition(pol, "Accepted") or {}).get("status") == "True"
    assert (condition(pol, "BudgetExhausted") or {}).get("reason") == "PrometheusNotConfigured"

    # A pool whose CacheTier is missing still deploys (without offload) and says Degraded.
    await cluster.create(pool_8b)
    pool = await eventually(lambda: condition(cluster.pool("llama-8b"), "Degraded")
                            and cluster.pool("llama-8b"), "Degraded")
    degraded = condition(pool, "Degraded")
    assert degraded and degraded["status"] == "True"
    assert degraded["reason"] == "CacheTierNotFound"
    assert "--kv-offloading-size" not in vllm_args(deployment(cluster) or {})

    # The references appear -> resolved on the next tick, offload applied.
    await cluster.create(tier)
    await eventually(lambda: "--kv-offloading-size" in vllm_args(deployment(cluster) or {}),
                     "offload flags after the tier appears")
    await eventually(lambda: (condition(cluster.pool("llama-8b"), "Degraded") or {})
                     .get("status") == "False", "Degraded=False")
    await eventually(lambda: cluster.policy("chat")["status"]["resolvedPools"] == ["llama-8b"],
                     "one resolved pool")
    tier_obj = await eventually(lambda: (cluster.tier("shared-cache") or {}).get("status", {})
                                .get("pools") and cluster.tier("shared-cache"), "tier status")
    assert tier_obj["status"]["pools"] == ["llama-8b"]
    assert (condition(tier_obj, "Ready") or {}).get("status") == "True"


async def test_operator_restart_creates_no_duplicates(cluster: Cluster, operator: Any,
                                                      pool_8b: dict[str, Any]) -> None:
    stop = await operator()
    await cluster.create(pool_8b)
    await eventually(lambda: deployment(cluster), "the Deployment")
    await stop()
    cluster.patch_stored(API, "inferencepools", "llama-8b", {"replicas": 4})
    await operator()
    await eventually(lambda: deployment(cluster)["spec"]["replicas"] == 4,
                     "change made while the operator was down")
    await eventually(lambda: cluster.pool("llama-8b")["status"]["observedGeneration"] == 2,
                     "observedGeneration after restart")
    for api_version, plural in CHILDREN:
        assert cluster.names(api_version, plural) == ["llama-8b"]


async def test_external_pool_reports_selected_pods(cluster: Cluster, operator: Any) -> None:
    await operator()
    await cluster.create({
        "apiVersion": API, "kind": "InferencePool", "metadata": {"name": "adopted"},
        "spec": {"mode": "External", "model": {"name": "m"}, "resources": {"gpus": 0},
                 "selector": {"matchLabels": {"app": "my-vllm"}}}})
    await cluster.create({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": "my-vllm-0", "labels": {"app": "my-vllm"}},
                          "status": {"podIP": "10.1.0.9",
                                     "conditions": [{"type": "Ready", "status": "True"}]}})
    pool = await eventually(lambda: (cluster.pool("adopted") or {}).get("status", {})
                            .get("readyReplicas") == 1 and cluster.pool("adopted"),
                            "external endpoints")
    assert pool["status"]["endpoints"] == [{"name": "my-vllm-0", "address": "10.1.0.9:8000",
                                            "ready": True}]
    assert pool["status"]["selector"] == "app=my-vllm"
    assert deployment(cluster, "adopted") is None


def absent(cluster: Cluster, api_version: str, plural: str, name: str) -> bool:
    return cluster.get(api_version, plural, name) is None

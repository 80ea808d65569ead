"""The same lifecycle against a real cluster: opt-in. Runs only with KUBECONFIG set, and only
when the current context looks like a disposable test cluster (its name contains kind, k3d,
minikube or test). The kvroute CRDs must be installed (``kubectl apply -f crds/``); the test
creates and removes its own namespace. No pods become ready (no GPUs needed): the test checks
children, status and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest
from kvroute_api import API_VERSION
from kvroute_operator.context import OperatorConfig
from kvroute_operator.kube import KubeClient, KubeConnection
from kvroute_operator.runner import build_registry

from tests.k8s.conftest import load_example

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
TEST_CONTEXT_MARKERS = ("kind", "k3d", "minikube", "test")
WAIT_SECONDS = 120.0


def _guard() -> None:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("set KUBECONFIG to run the real-cluster suite")
    from kubernetes import config

    _, active = config.list_kube_config_contexts()
    name = str((active or {}).get("name", ""))
    if not any(marker in name for marker in TEST_CONTEXT_MARKERS):
        pytest.skip(f"context {name!r} does not look like a test cluster "
                    f"(needs one of {TEST_CONTEXT_MARKERS} in its name)")


async def _until(check: Any, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while asyncio.get_running_loop().time() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_pool_lifecycle_on_a_real_cluster(examples_dir: Path) -> None:
    _guard()
    kube = KubeClient(KubeConnection.from_environment())
    namespace = f"kvroute-test-{uuid.uuid4().hex[:6]}"
    await kube._request("POST", "/api/v1/namespaces",
                        body={"apiVersion": "v1", "kind": "Namespace",
                              "metadata": {"name": namespace}})
    config = OperatorConfig(resync_seconds=2)
    stop_flag = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=build_registry(config), standalone=True, namespaces=[namespace],
        memo=kopf.Memo(config=config), stop_flag=stop_flag))
    try:
        pool = load_example(examples_dir, "pool-llama-8b.yaml")
        pool["metadata"]["namespace"] = namespace
        pool["spec"].pop("autoscaling")
        await kube._request("POST", f"/apis/{API_VERSION}/namespaces/{namespace}/inferencepools",
                            body=pool)

        async def deployment() -> dict[str, Any] | None:
            return await kube.get("apps/v1", "Deployment", namespace, "llama-8b")

        dep = await _until(deployment, "the Deployment")
        assert dep["metadata"]["ownerReferences"][0]["kind"] == "InferencePool"

        async def observed() -> bool:
            obj = await kube.get(API_VERSION, "InferencePool", namespace, "llama-8b")
            return bool(((obj or {}).get("status") or {}).get("observedGeneration"))

        await _until(observed, "status")
        await kube.scale(API_VERSION, "InferencePool", namespace, "llama-8b", 3)

        async def scaled() -> bool:
            return ((await deployment()) or {}).get("spec", {}).get("replicas") == 3

        await _until(scaled, "the Deployment following kubectl scale")
        await kube.delete("policy/v1", "PodDisruptionBudget", namespace, "llama-8b")

        async def pdb_back() -> bool:
            return await kube.get("policy/v1", "PodDisruptionBudget", namespace,
                                  "llama-8b") is not None

        await _until(pdb_back, "the PDB recreated")
        await kube.delete(API_VERSION, "InferencePool", namespace, "llama-8b")

        async def gone() -> bool:
            return await deployment() is None

        await _until(gone, "children deleted")
    finally:
        stop_flag.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 30)
        with contextlib.suppress(Exception):
            await kube._request("DELETE", f"/api/v1/namespaces/{namespace}")
        await kube.close()

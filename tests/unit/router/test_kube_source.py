"""Kubernetes mode without a cluster: watch events applied to the datastore (pods matched by
the pool's selector, readiness, deletions)."""

from __future__ import annotations

from typing import Any

from kvroute_router.datastore.kube_source import KubernetesSource, parse_selector, pod_ready
from kvroute_router.datastore.store import Datastore


def pool(name: str = "llama", selector: str | None = "app=vllm,kvroute.io/pool=llama"
         ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "inference", "uid": "u1"},
        "spec": {"model": {"name": "llama-8b", "source": "hf://meta/llama"},
                 "engine": {"port": 8000}},
    }
    if selector:
        body["status"] = {"selector": selector}
    return body


def pod(name: str, ip: str | None, ready: bool, labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "inference",
                         "labels": labels or {"app": "vllm", "kvroute.io/pool": "llama"}},
            "status": {"podIP": ip, "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def test_selector_and_readiness_helpers() -> None:
    assert parse_selector("a=b,c==d,e!=f") == {"a": "b", "c": "d"}
    assert pod_ready(pod("p", "10.0.0.1", True))
    assert not pod_ready(pod("p", None, True)) and not pod_ready(pod("p", "10.0.0.1", False))


def test_watch_events_drive_pool_endpoints() -> None:
    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._relist("pods", [pod("a", "10.0.0.1", True), pod("b", "10.0.0.2", False),
                            pod("c", "10.0.0.3", True, {"app": "other"})])
    source._relist("inferencepools", [pool()])
    state = store.pool("inference/llama")
    assert state is not None and [e.address for e in state.endpoints.values()] == ["10.0.0.1:8000"]
    source._event("pods", "MODIFIED", pod("b", "10.0.0.2", True))
    assert sorted(e.name for e in store.endpoints()) == ["a", "b"]
    source._event("pods", "DELETED", pod("a", "10.0.0.1", True))
    assert [e.name for e in store.endpoints()] == ["b"]
    source._relist("routepolicies", [{
        "apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
        "metadata": {"name": "chat", "namespace": "inference"},
        "spec": {"match": {"model": "chat"}, "pools": [{"name": "llama"}]}}])
    resolution = store.resolve("chat", {})
    assert resolution is not None and resolution.pools[0][0] is store.pool("inference/llama")
    source._event("inferencepools", "DELETED", pool())
    assert store.pool("inference/llama") is None
    source._event("routepolicies", "ADDED", {"metadata": {"name": "bad"}, "spec": {}})
    assert "default/bad" not in store.policies()  # invalid objects are ignored

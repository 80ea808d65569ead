"""Pure computation of an InferencePool's status from what exists: its Deployment (Managed) and
the pods it selects, or its static endpoints (External)."""

from __future__ import annotations

from typing import Any

from kvroute_api.inference_pool import InferencePool

from kvroute_operator.builders import selector_string
from kvroute_operator.conditions import ConditionUpdate


def pod_ready(pod: dict[str, Any]) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _endpoints(pool: InferencePool, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    port = pool.spec.engine.port
    out = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        meta = pod.get("metadata", {})
        if meta.get("deletionTimestamp"):
            continue  # terminating: draining, no longer an endpoint
        ip = (pod.get("status") or {}).get("podIP")
        out.append({"name": meta.get("name", ""), "address": f"{ip}:{port}" if ip else "",
                    "ready": bool(ip) and pod_ready(pod)})
    return out


def _deployment_problem(deployment: dict[str, Any] | None) -> str | None:
    for condition in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("status") == "False":
            return f"rollout stalled: {condition.get('message', condition.get('reason', ''))}"
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return f"pods cannot be created: {condition.get('message', '')}"
    return None


def observe_pool(pool: InferencePool, deployment: dict[str, Any] | None,
                 pods: list[dict[str, Any]],
                 tier_problem: str | None = None) -> tuple[dict[str, Any], list[ConditionUpdate]]:
    """(status fields, Ready/Progressing/Degraded conditions)."""
    endpoints = _endpoints(pool, pods)
    ready = sum(1 for e in endpoints if e["ready"])
    status: dict[str, Any] = {"selector": selector_string(pool), "endpoints": endpoints,
                              "replicas": len(endpoints), "readyReplicas": ready}
    if pool.spec.mode == "External":
        if pool.spec.selector is None:
            static = [{"name": e.name or e.address, "address": e.address, "ready": False}
                      for e in pool.spec.endpoints]
            status.update(endpoints=static, replicas=len(static), readyReplicas=0)
            return status, [
                ConditionUpdate("Ready", "True", "StaticEndpoints",
                                f"{len(static)} static endpoints; the routers probe them"),
                ConditionUpdate("Progressing", "False", "External", "nothing to deploy"),
                ConditionUpdate("Degraded", "False", "AsExpected", "")]
        return status, [
            ConditionUpdate("Ready", "True" if ready else "False",
                            "Serving" if ready else "NoEngineReady",
                            f"{ready}/{len(endpoints)} selected engines ready "
                            f"(selector {status['selector']})"),
            ConditionUpdate("Progressing", "False", "External", "nothing to deploy"),
            ConditionUpdate("Degraded", "False", "AsExpected", "")]

    desired = pool.spec.replicas
    if desired == 0:
        ready_cond = ConditionUpdate("Ready", "False", "ScaledToZero", "spec.replicas is 0")
    elif ready:
        ready_cond = ConditionUpdate("Ready", "True", "Serving",
                                     f"{ready}/{desired} engines ready")
    else:
        ready_cond = ConditionUpdate("Ready", "False", "NoEngineReady",
                                     f"0/{desired} engines ready (model loading takes minutes)")
    dep_status = (deployment or {}).get("status") or {}
    updated = dep_status.get("updatedReplicas", len(endpoints))
    if ready == desired and len(endpoints) == desired and updated >= desired:
        progressing = ConditionUpdate("Progressing", "False", "RolloutComplete",
                                      f"{desired} engines up to date")
    else:
        progressing = ConditionUpdate(
            "Progressing", "True", "RollingOut",
            f"{ready}/{desired} ready, {len(endpoints)} exist, {updated} up to date")
    problems = [p for p in (_deployment_problem(deployment), tier_problem) if p]
    if problems:
        reason = "CacheTierNotFound" if tier_problem and not _deployment_problem(deployment) \
            else "RolloutStalled"
        degraded = ConditionUpdate("Degraded", "True", reason, "; ".join(problems))
    else:
        degraded = ConditionUpdate("Degraded", "False", "AsExpected", "")
    return status, [ready_cond, progressing, degraded]

"""Idempotent reconcilers of the three kinds: read what exists, apply what should exist, and
write the status (observedGeneration, conditions, endpoints, counts), posting Kubernetes Events
for condition transitions. Handlers and timers call these; they never sleep: waiting is a
``kopf.TemporaryError`` with a delay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kvroute_api import API_VERSION
from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import RoutePolicy
from pydantic import ValidationError

from kvroute_operator.autoscaling import AutoscalerMemory
from kvroute_operator.budgets import policy_budget_status
from kvroute_operator.builders import (
    MANAGED_BY,
    Owner,
    build_children,
    selector_string,
)
from kvroute_operator.conditions import ConditionUpdate, Transition, merge_conditions
from kvroute_operator.context import OperatorContext
from kvroute_operator.kube import KubeApiError
from kvroute_operator.prometheus import (
    PrometheusUnavailableError,
    percent,
    pod_selector,
    prefix_cache_hit_rate,
    response_cache_status,
    selector_matchers,
)
from kvroute_operator.status import observe_pool

RETRY_DELAY_SECONDS = 10
CHILD_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"),
               ("policy/v1", "PodDisruptionBudget"))

log = logging.getLogger(__name__)


def _wire(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a body the API models parse (status and server fields dropped)."""
    return {"apiVersion": body.get("apiVersion", API_VERSION), "kind": body.get("kind"),
            "metadata": dict(body.get("metadata", {})), "spec": dict(body.get("spec", {}))}


async def _write_status(ctx: OperatorContext, body: kopf.Body, kind: str,
                        status: dict[str, Any], updates: list[ConditionUpdate]) -> None:
    meta = body.get("metadata", {})
    old_status = body.get("status") or {}
    generation = meta.get("generation")
    conditions, transitions = merge_conditions(old_status.get("conditions") or [], updates,
                                               generation)
    status = {**status, "conditions": conditions}
    if generation is not None:
        status["observedGeneration"] = generation
    try:
        await ctx.kube.patch_status(API_VERSION, kind, meta.get("namespace"), meta["name"],
                                    status)
    except KubeApiError as exc:
        if exc.status == 404:
            return  # deleted meanwhile
        raise kopf.TemporaryError(f"status write failed: {exc}",
                                  delay=RETRY_DELAY_SECONDS) from exc
    _post_transitions(body, transitions)


def _post_transitions(body: kopf.Body, transitions: list[Transition]) -> None:
    for t in transitions:
        if t.old_status is None and t.new_status != "True" and t.type != "Ready":
            continue  # a condition appearing as False/Unknown is not news (except Ready)
        bad = (t.type in ("Degraded", "BudgetExhausted") and t.new_status == "True") or (
            t.type in ("Ready", "Accepted", "ResolvedRefs", "ScalingActive")
            and t.new_status == "False")
        kopf.event(body, type="Warning" if bad else "Normal", reason=t.reason,
                   message=f"{t.type}={t.new_status}: {t.message}")


def _invalid(kind: str, exc: ValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first["loc"])
    return f"invalid {kind}: {where}: {first['msg']}"


# --------------------------------------------------------------------------- InferencePool


async def _resolve_tier(ctx: OperatorContext,
                        pool: InferencePool) -> tuple[CacheTier | None, str | None]:
    """(tier, problem) — problem says why a referenced tier cannot be used."""
    ref = pool.spec.cache_tier_ref
    if ref is None:
        return None, None
    raw = await ctx.kube.get(API_VERSION, "CacheTier", pool.metadata.namespace, ref.name)
    if raw is None:
        return None, f"CacheTier {ref.name!r} not found; engines run without KV offload"
    try:
        return CacheTier.model_validate(_wire(raw)), None
    except ValidationError as exc:
        return None, _invalid("CacheTier", exc)


async def _remove_children(ctx: OperatorContext, namespace: str | None, name: str,
                           uid: str | None) -> list[str]:
    """Delete the children this operator created for the pool; returns what was deleted."""
    removed = []
    for api_version, kind in CHILD_KINDS:
        child = await ctx.kube.get(api_version, kind, namespace, name)
        if child is None:
            continue
        labels = child.get("metadata", {}).get("labels") or {}
        owners = child.get("metadata", {}).get("ownerReferences") or []
        ours = all(labels.get(k) == v for k, v in MANAGED_BY.items()) and (
            uid is None or not owners or any(o.get("uid") == uid for o in owners))
        if ours and await ctx.kube.delete(api_version, kind, namespace, name):
            removed.append(f"{kind}/{name}")
    return removed


async def reconcile_pool(ctx: OperatorContext, body: kopf.Body,
                         extra_conditions: list[ConditionUpdate] | None = None,
                         extra_status: dict[str, Any] | None = None) -> None:
    """Apply the pool's children (Managed) or read its endpoints (External); write status."""
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace"), meta["name"]
    try:
        pool = InferencePool.model_validate(_wire(body))
    except ValidationError as exc:
        message = _invalid("InferencePool", exc)
        await _write_status(ctx, body, "InferencePool", {}, [
            ConditionUpdate("Ready", "False", "InvalidSpec", message),
            ConditionUpdate("Degraded", "True", "InvalidSpec", message)])
        raise kopf.PermanentError(message) from exc

    updates = list(extra_conditions or [])
    deployment: dict[str, Any] | None = None
    tier_problem: str | None = None
    try:
        if pool.spec.mode == "Managed":
            tier, tier_problem = await _resolve_tier(ctx, pool)
            owner = Owner(name=name, uid=str(meta.get("uid", ""))) if meta.get("uid") else None
            for child in build_children(pool, tier, owner):
                applied = await ctx.kube.apply(child)
                if child["kind"] == "Deployment":
                    deployment = applied
            pods = await ctx.kube.list("v1", "Pod", namespace, selector_string(pool))
        else:
            removed = await _remove_children(ctx, namespace, name, meta.get("uid"))
            if removed:
                kopf.info(body, reason="Deleted",
                          message="External pool: removed " + ", ".join(removed))
            pods = []
            if pool.spec.selector is not None:
                pods = await ctx.kube.list("v1", "Pod", namespace, selector_string(pool))
    except KubeApiError as exc:
        if exc.status in (404, 409):
            raise kopf.TemporaryError(f"API server answered {exc}; retrying",
                                      delay=RETRY_DELAY_SECONDS) from exc
        raise
    status, pool_updates = observe_pool(pool, deployment, pods, tier_problem)
    await _prefix_cache_hit_rate(ctx, pool, pods, status)
    status.update(extra_status or {})
    await _write_status(ctx, body, "InferencePool", status, pool_updates + updates)


async def _prefix_cache_hit_rate(ctx: OperatorContext, pool: InferencePool,
                                 pods: list[dict[str, Any]], status: dict[str, Any]) -> None:
    """``status.prefixCacheHitRate`` (the CACHE-HIT column) from the engines' prefix-cache
    counters in Prometheus; left out without Prometheus, pods or traffic."""
    prometheus = ctx.prometheus(None)
    namespace = pool.metadata.namespace or "default"
    if prometheus is None or not pods:
        return
    matchers = (pod_selector(namespace, pool.metadata.name) if pool.spec.mode == "Managed"
                else selector_matchers(namespace, [p["metadata"]["name"] for p in pods]))
    try:
        rate = await prefix_cache_hit_rate(prometheus, matchers)
    except PrometheusUnavailableError as exc:
        log.info("prefix-cache hit rate of %s unknown: %s", pool.metadata.name, exc)
        return
    if rate is not None:
        status["prefixCacheHitRate"] = percent(rate)


async def delete_pool(ctx: OperatorContext, body: kopf.Body) -> None:
    """Remove the pool's children (owner references make the garbage collector do the same;
    deleting explicitly keeps cleanup prompt and works where no collector runs)."""
    meta = body.get("metadata", {})
    ctx.autoscalers.pop(str(meta.get("uid", meta["name"])), None)
    try:
        removed = await _remove_children(ctx, meta.get("namespace"), meta["name"],
                                         meta.get("uid"))
    except KubeApiError as exc:
        raise kopf.TemporaryError(f"cleanup failed: {exc}", delay=RETRY_DELAY_SECONDS) from exc
    if removed:
        log.info("deleted %s", ", ".join(removed))


async def autoscale_pool(ctx: OperatorContext, body: kopf.Body
                         ) -> tuple[list[ConditionUpdate], dict[str, Any]]:
    """One autoscaler evaluation when due: (conditions, status fields) for the status write.
    Writes spec.replicas through the scale subresource unless the pool is in dry-run mode."""
    try:
        pool = InferencePool.model_validate(_wire(body))
    except ValidationError:
        return [], {}
    auto = pool.spec.autoscaling
    if auto is None or not auto.enabled or pool.spec.mode != "Managed":
        return [], {}
    meta = body.get("metadata", {})
    key = str(meta.get("uid", meta["name"]))
    memory = ctx.autoscalers.setdefault(key, AutoscalerMemory())
    now = time.monotonic()
    if not memory.due(now, auto):
        conditions, fields = memory.last_report
        return list(conditions), dict(fields)
    prometheus = ctx.prometheus(auto.prometheus_url)
    current = pool.spec.replicas
    if prometheus is None:
        memory.last_evaluated = now
        memory.last_report = ([ConditionUpdate(
            "ScalingActive", "False", "PrometheusNotConfigured",
            f"holding {current} replicas: set spec.autoscaling.prometheusUrl or the "
            "operator's --prometheus-url")], {})
        return memory.last_report
    try:
        load = await prometheus.pool_load(pod_selector(meta.get("namespace") or "",
                                                       pool.metadata.name))
    except PrometheusUnavailableError as exc:
        memory.last_evaluated = now
        memory.last_report = ([ConditionUpdate("ScalingActive", "False",
                                               "PrometheusUnavailable",
                                               f"holding {current} replicas: {exc}")], {})
        return memory.last_report
    decision = memory.decide(now, current, load, auto)
    status: dict[str, Any] = {"recommendedReplicas": decision.desired}
    if decision.changes:
        if auto.dry_run:
            kopf.info(body, reason="Recommendation", message=f"dry run: {decision.message}")
        else:
            await ctx.kube.scale(API_VERSION, "InferencePool", meta.get("namespace"),
                                 meta["name"], decision.desired)
            kopf.info(body, reason=decision.reason, message=decision.message)
    reason = "DryRun" if auto.dry_run else decision.reason
    memory.last_report = ([ConditionUpdate("ScalingActive", "True", reason, decision.message)],
                          status)
    return memory.last_report


# --------------------------------------------------------------------------- RoutePolicy


async def reconcile_policy(ctx: OperatorContext, body: kopf.Body) -> None:
    """Resolve the policy's references, check its model name is unclaimed, and report its
    budgets' usage from Prometheus."""
    meta = body.get("metadata", {})
    namespace = meta.get("namespace")
    try:
        policy = RoutePolicy.model_validate(_wire(body))
    except ValidationError as exc:
        message = _invalid("RoutePolicy", exc)
        await _write_status(ctx, body, "RoutePolicy", {}, [
            ConditionUpdate("Accepted", "False", "InvalidSpec", message)])
        raise kopf.PermanentError(message) from exc

    updates: list[ConditionUpdate] = []
    # Accepted: the model name is not owned by an older policy in the namespace.
    rivals = [p for p in await ctx.kube.list(API_VERSION, "RoutePolicy", namespace)
              if p.get("metadata", {}).get("name") != policy.metadata.name
              and (p.get("spec", {}).get("match") or {}).get("model") == policy.spec.match.model
              and not (p.get("spec", {}).get("match") or {}).get("headers")
              and not policy.spec.match.headers]
    older = [p for p in rivals
             if (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"])
             < (meta.get("creationTimestamp") or "", policy.metadata.name)]
    if older:
        updates.append(ConditionUpdate(
            "Accepted", "False", "ModelConflict",
            f"model {policy.spec.match.model!r} is already routed by RoutePolicy "
            f"{older[0]['metadata']['name']!r}; add spec.match.headers or rename the model"))
    else:
        updates.append(ConditionUpdate("Accepted", "True", "Accepted",
                                       f"routing model {policy.spec.match.model!r}"))

    resolved: list[str] = []
    missing: list[str] = []
    for target in policy.spec.pools:
        found = await ctx.kube.get(API_VERSION, "InferencePool", namespace, target.name)
        (resolved if found is not None else missing).append(target.name)
    problems = [f"InferencePool {n!r} not found" for n in missing]
    reason = "PoolNotFound" if missing else "AllRefsResolved"
    if policy.spec.response_cache is not None:
        tier = policy.spec.response_cache.cache_tier_ref.name
        if await ctx.kube.get(API_VERSION, "CacheTier", namespace, tier) is None:
            problems.append(f"CacheTier {tier!r} not found (response cache disabled)")
            reason = reason if missing else "CacheTierNotFound"
    updates.append(ConditionUpdate(
        "ResolvedRefs", "False" if problems else "True", reason,
        "; ".join(problems) if problems else f"pools: {', '.join(resolved)}"))

    status: dict[str, Any] = {"resolvedPools": resolved}
    prometheus = ctx.prometheus(None)
    if not policy.spec.budgets:
        updates.append(ConditionUpdate("BudgetExhausted", "False", "NoBudgets",
                                       "the policy defines no budgets"))
    elif prometheus is None:
        updates.append(ConditionUpdate("BudgetExhausted", "Unknown", "PrometheusNotConfigured",
                                       "start the operator with --prometheus-url to see usage"))
    else:
        try:
            usage = {b.name: await prometheus.budget_usage(policy.metadata.name, b,
                                                           namespace or "default")
                     for b in policy.spec.budgets}
        except PrometheusUnavailableError as exc:
            updates.append(ConditionUpdate("BudgetExhausted", "Unknown",
                                           "PrometheusUnavailable", str(exc)))
        else:
            budgets, used, condition = policy_budget_status(policy.spec.budgets, usage)
            status["budgets"] = [b.to_wire() for b in budgets]
            status["budgetUsedPercent"] = used
            updates.append(condition)
    await _write_status(ctx, body, "RoutePolicy", status, updates)


# --------------------------------------------------------------------------- CacheTier


async def reconcile_tier(ctx: OperatorContext, body: kopf.Body) -> None:
    """Report which pools use the tier."""
    meta = body.get("metadata", {})
    try:
        tier = CacheTier.model_validate(_wire(body))
    except ValidationError as exc:
        message = _invalid("CacheTier", exc)
        await _write_status(ctx, body, "CacheTier", {}, [
            ConditionUpdate("Ready", "False", "InvalidSpec", message)])
        raise kopf.PermanentError(message) from exc
    pools = sorted(
        p["metadata"]["name"]
        for p in await ctx.kube.list(API_VERSION, "InferencePool", meta.get("namespace"))
        if ((p.get("spec") or {}).get("cacheTierRef") or {}).get("name") == tier.metadata.name)
    parts = []
    if tier.spec.kv is not None:
        parts.append(f"KV offload {tier.spec.kv.cpu_offload_gib:g} GiB/replica")
    if tier.spec.response is not None:
        parts.append(f"response cache on {tier.spec.response.backend}")
    used = f"; used by {', '.join(pools)}" if pools else "; no pool references it"
    status: dict[str, Any] = {"pools": pools}
    prometheus = ctx.prometheus(None)
    if tier.spec.response is not None and prometheus is not None:
        key = f"{meta.get('namespace') or 'default'}/{tier.metadata.name}"
        try:
            entries, rate = await response_cache_status(prometheus, key)
        except PrometheusUnavailableError as exc:
            log.info("response-cache status of %s unknown: %s", key, exc)
        else:
            if entries is not None:
                status["entries"] = entries
            if rate is not None:
                status["hitRate"] = percent(rate)
    await _write_status(ctx, body, "CacheTier", status, [
        ConditionUpdate("Ready", "True", "Accepted", ", ".join(parts) + used)])

"""kopf handlers: thin functions that hand the object to the idempotent reconcilers.

:func:`register_handlers` adds them to a registry (kopf's default one for
``kopf run -m kvroute_operator``, a fresh one for ``kvroute operator`` and the tests). All kopf
settings are made in one startup handler; shared clients live in ``memo`` and are closed in the
cleanup handler.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kvroute_api import GROUP

from kvroute_operator.context import OperatorConfig, OperatorContext
from kvroute_operator.kube import KubeClient, KubeConnection
from kvroute_operator.reconcile import (
    autoscale_pool,
    delete_pool,
    reconcile_policy,
    reconcile_pool,
    reconcile_tier,
)

PREFIX = "kvroute.io"
FINALIZER = f"{PREFIX}/finalizer"
WATCH_SERVER_TIMEOUT_SECONDS = 270
WATCH_CLIENT_TIMEOUT_SECONDS = 300
WORKER_LIMIT = 32


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """Every kopf setting the operator relies on, in one place."""
    settings.peering.standalone = True  # one active replica; no kopf.dev peering CRDs
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_SECONDS
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT_SECONDS
    settings.watching.connect_timeout = 30
    settings.batching.worker_limit = WORKER_LIMIT
    settings.posting.level = logging.WARNING  # only warnings from logs become Events
    settings.posting.reporting_component = "kvroute-operator"
    settings.execution.max_workers = 4
    # Timers stop promptly on shutdown (kopf polls an exiting timer this often).
    settings.background.cancellation_polling = 1
    settings.background.instant_exit_timeout = 0.1


def _context(memo: Any) -> OperatorContext:
    ctx = memo.get("context")
    if not isinstance(ctx, OperatorContext):
        raise kopf.TemporaryError("operator context not initialised yet", delay=1)
    return ctx


def register_handlers(registry: kopf.OperatorRegistry,
                      resync_seconds: float | None = None) -> None:
    """Add the operator's handlers to ``registry``. ``resync_seconds`` is the period of the
    timers that repair drift, refresh status, autoscale and read budgets."""
    interval = resync_seconds or OperatorConfig.from_environment().resync_seconds

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_settings(settings)
        config = memo.get("config")
        if not isinstance(config, OperatorConfig):
            config = OperatorConfig.from_environment()
        connection = config.connection or KubeConnection.from_environment()
        memo["context"] = OperatorContext(config=config, kube=KubeClient(connection))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        ctx = memo.get("context")
        if isinstance(ctx, OperatorContext):
            await ctx.close()

    # InferencePool ------------------------------------------------------------------------
    @kopf.on.create(GROUP, "inferencepools", registry=registry)
    @kopf.on.resume(GROUP, "inferencepools", registry=registry)
    @kopf.on.update(GROUP, "inferencepools", registry=registry)
    @kopf.timer(GROUP, "inferencepools", interval=interval, initial_delay=interval,
                registry=registry)
    async def pool_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        ctx = _context(memo)
        conditions, status = await autoscale_pool(ctx, body)  # evaluates only when due
        await reconcile_pool(ctx, body, conditions, status)

    @kopf.on.delete(GROUP, "inferencepools", registry=registry)
    async def pool_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await delete_pool(_context(memo), body)

    # RoutePolicy --------------------------------------------------------------------------
    @kopf.on.create(GROUP, "routepolicies", registry=registry)
    @kopf.on.resume(GROUP, "routepolicies", registry=registry)
    @kopf.on.update(GROUP, "routepolicies", registry=registry)
    @kopf.timer(GROUP, "routepolicies", interval=interval, initial_delay=interval,
                registry=registry)
    async def policy_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await reconcile_policy(_context(memo), body)

    # CacheTier ----------------------------------------------------------------------------
    @kopf.on.create(GROUP, "cachetiers", registry=registry)
    @kopf.on.resume(GROUP, "cachetiers", registry=registry)
    @kopf.on.update(GROUP, "cachetiers", registry=registry)
    @kopf.timer(GROUP, "cachetiers", interval=interval, initial_delay=interval,
                registry=registry)
    async def tier_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await reconcile_tier(_context(memo), body)

"""What the operator's handlers share, kept in kopf's ``memo``: the configuration, the
Kubernetes client, Prometheus clients per URL, and the autoscaler's memory per pool."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvroute_operator.autoscaling import AutoscalerMemory
from kvroute_operator.kube import KubeClient, KubeConnection
from kvroute_operator.prometheus import PrometheusMetrics

DEFAULT_RESYNC_SECONDS = 15.0


@dataclass(frozen=True)
class OperatorConfig:
    """Operator settings (CLI flags, or ``KVROUTE_*`` environment variables under
    ``kopf run -m kvroute_operator``)."""

    prometheus_url: str | None = None
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    # Explicit API server connection (tests); None loads in-cluster config or kubeconfig.
    connection: KubeConnection | None = None

    @classmethod
    def from_environment(cls) -> OperatorConfig:
        return cls(prometheus_url=os.environ.get("KVROUTE_PROMETHEUS_URL") or None,
                   resync_seconds=float(os.environ.get("KVROUTE_RESYNC_SECONDS",
                                                       DEFAULT_RESYNC_SECONDS)))


@dataclass
class OperatorContext:
    """Shared clients and state; created in the startup handler, closed in cleanup."""

    config: OperatorConfig
    kube: KubeClient
    prometheus_clients: dict[str, PrometheusMetrics] = field(default_factory=dict)
    autoscalers: dict[str, AutoscalerMemory] = field(default_factory=dict)

    def prometheus(self, url: str | None) -> PrometheusMetrics | None:
        url = url or self.config.prometheus_url
        if not url:
            return None
        if url not in self.prometheus_clients:
            self.prometheus_clients[url] = PrometheusMetrics(url)
        return self.prometheus_clients[url]

    async def close(self) -> None:
        await self.kube.close()

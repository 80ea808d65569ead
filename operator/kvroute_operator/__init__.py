"""kvroute's Kubernetes operator (kopf): reconciles InferencePool, RoutePolicy and CacheTier
into vLLM Deployments, Services and PodDisruptionBudgets, with status, autoscaling and budget
usage from Prometheus.

``kopf run -m kvroute_operator`` imports this package: its handlers are added to kopf's default
registry here (configured by ``KVROUTE_PROMETHEUS_URL`` and ``KVROUTE_RESYNC_SECONDS``).
``kvroute operator`` builds its own registry instead (:mod:`kvroute_operator.runner`).
"""

import kopf

from kvroute_operator.handlers import register_handlers

register_handlers(kopf.get_default_registry())

"""kvroute.io/v1alpha1 API: pydantic v2 models of InferencePool, RoutePolicy and CacheTier.

These models are the single source of truth: the CRD manifests in ``crds/*.yaml`` are generated
from them (:mod:`kvroute_api.crdgen`), ``kvroute validate`` checks manifests against them
(:mod:`kvroute_api.manifests`), and the operator and router parse custom resources with them.
"""

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import API_VERSION, GROUP, VERSION
from kvroute_api.route_policy import RoutePolicy

__all__ = ["API_VERSION", "GROUP", "VERSION", "CacheTier", "InferencePool", "RoutePolicy"]

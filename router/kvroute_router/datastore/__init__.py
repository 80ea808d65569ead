"""The router's view of the world: pools, route policies and endpoints, fed by a config file
(embedded mode) or Kubernetes watches."""

from kvroute_router.datastore.store import Datastore, EndpointSpec, PoolState, Resolution

__all__ = ["Datastore", "EndpointSpec", "PoolState", "Resolution"]

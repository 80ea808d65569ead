"""Which request headers the router believes, and from whom (docs/security.md).

*Trust-gated* headers choose what a request is charged to or routed by: every ``x-kvroute-*``
header (tenant, priority, namespace scope), each ``source: Header`` policy's tenant header, and
every header a policy matches on (``spec.match.headers``). They are believed only when they
came over a trusted hop; from anyone else they are dropped before routing, so a client can
pick neither its tenant, its priority, its policy nor its namespace. The entry points decide
what a trusted hop is:

* proxy — the TCP peer is in ``trusted_cidrs`` (or every peer, with ``trust_all``:
  ``--trust-tenant-header``, for a proxy only a gateway can reach);
* ext_proc — the router was told its gateway strips clients' copies
  (``--ext-proc-trust-gateway-headers``);
* Pick — the caller authenticated (:mod:`kvroute_router.grpcauth`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Protocol

from kvroute_api.route_policy import RoutePolicy

from kvroute_router.datastore.resolution import NAMESPACE_HEADER

GATED_PREFIX = "x-kvroute-"
DEFAULT_TENANT_HEADER = "x-kvroute-tenant"


class PolicyCatalog(Protocol):
    """What header trust reads of the datastore: the policies, and a version that changes
    with them."""

    @property
    def version(self) -> int: ...

    def policies(self) -> Mapping[str, RoutePolicy]: ...


class HeaderTrust:
    """The gated header names of the current policies, and the trusted proxy networks."""

    def __init__(self, datastore: PolicyCatalog, trusted_cidrs: Iterable[str] = (),
                 trust_all: bool = False) -> None:
        self.datastore = datastore
        self.trust_all = trust_all
        self.networks = [ipaddress.ip_network(c, strict=False) for c in trusted_cidrs]
        self._cache: tuple[int, frozenset[str], frozenset[str]] = (-1, frozenset(), frozenset())

    def peer_trusted(self, peer: str | None) -> bool:
        """Whether a proxy client at ``peer`` (an IP address) is a trusted hop."""
        if self.trust_all:
            return True
        if not peer or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def _names(self) -> tuple[frozenset[str], frozenset[str]]:
        """(tenant headers, every gated name besides the ``x-kvroute-`` prefix)."""
        version, tenant, gated = self._cache
        if version != self.datastore.version:
            policies = self.datastore.policies().values()
            tenant = frozenset(p.spec.tenancy.header for p in policies
                               if p.spec.tenancy.source == "Header") | {DEFAULT_TENANT_HEADER}
            gated = tenant | {h.name for p in policies for h in p.spec.match.headers}
            self._cache = (self.datastore.version, tenant, gated)
        return tenant, gated

    def for_routing(self, headers: Mapping[str, str], trusted: bool) -> dict[str, str]:
        """The headers routing may read (lower-case names): gated ones only when trusted."""
        if trusted:
            return dict(headers)
        _, gated = self._names()
        return {k: v for k, v in headers.items()
                if not k.startswith(GATED_PREFIX) and k not in gated}

    def forwardable(self, name: str, trusted: bool) -> bool:
        """Whether a client's header (lower-case name) may go on to the engine: tenant and
        ``x-kvroute-*`` headers only from a trusted hop (match headers such as
        ``content-type`` are ordinary headers for the engine)."""
        if trusted:
            return True
        return not name.startswith(GATED_PREFIX) and name not in self._names()[0]


__all__ = ["DEFAULT_TENANT_HEADER", "GATED_PREFIX", "NAMESPACE_HEADER", "HeaderTrust",
           "PolicyCatalog"]

"""Which tenant a request belongs to, from the RoutePolicy's ``spec.tenancy``.

* ``source: Header`` — the tenant header is believed only when the request came over a
  trusted hop (docs/security.md): the entry points drop it otherwise
  (:mod:`kvroute_router.trust`), and the request is the default tenant, so a client cannot pick
  another tenant's budget by sending the header itself.
* ``source: APIKey`` — the bearer token is looked up in the Secret's mapping (tenant → key);
  unknown or missing keys are the default tenant. Keys are held only as SHA-256 digests
  (:mod:`kvroute_router.datastore.api_keys`): the token's digest is looked up, so no plaintext
  key stays in memory and a lookup takes the same time whatever the token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvroute_api.route_policy import TenancySpec

from kvroute_router.datastore.api_keys import KeyDigests, api_key_digest, digests_of


@dataclass(frozen=True)
class ResolvedTenant:
    """The tenant and where it came from (``header``, ``api-key`` or ``default``)."""

    name: str
    source: str


class TenantResolver:
    """Resolves tenants for one policy; rebuild it when the policy or its Secret changes."""

    def __init__(self, tenancy: TenancySpec, api_keys: Mapping[str, str] | None = None, *,
                 key_digests: KeyDigests | None = None) -> None:
        """``api_keys``: {tenant: key} in plaintext (hashed here, not kept); ``key_digests``:
        {sha256 digest: tenant}, e.g. from a Kubernetes Secret. Both may be given."""
        self.tenancy = tenancy
        self._tenant_by_digest: dict[str, str] = dict(key_digests or {})
        self._tenant_by_digest.update(digests_of(api_keys or {}))

    def resolve(self, headers: Mapping[str, str]) -> ResolvedTenant:
        """The tenant of the request's API key (``headers`` with lower-case names); the default
        tenant for an unknown or missing key, or when the policy's tenancy is not by API key."""
        default = ResolvedTenant(self.tenancy.default_tenant, "default")
        if self.tenancy.source != "APIKey":
            return default
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return default
        tenant = self._tenant_by_digest.get(api_key_digest(token))
        return ResolvedTenant(tenant, "api-key") if tenant is not None else default

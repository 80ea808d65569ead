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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvroute_api.route_policy import RoutePolicy, TenancySpec

from kvroute_router.datastore.api_keys import KeyDigests, api_key_digest, digests_of
from kvroute_router.datastore.store import Datastore, object_key

ApiKeyLookup = Callable[[RoutePolicy], Mapping[str, str]]
"""tenant → API key (plaintext) for a policy with ``tenancy.source: APIKey``: the embedded
mapping (``RouterSettings.api_keys``); hashed when the resolver is built. In Kubernetes mode
the datastore's digest tables (from the watched Secrets) are used as well."""


def no_api_keys(policy: RoutePolicy) -> Mapping[str, str]:
    """The embedded mapping of a router configured without API keys."""
    return {}


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


class TenantDirectory:
    """The one place a request's tenant is decided, shared by every component that needs it
    (the budget hook charges it, the response cache scopes entries by it), so they cannot
    disagree. Holds one :class:`TenantResolver` per policy, rebuilt when the policy object or
    its API-key Secret's digest table changes."""

    def __init__(self, datastore: Datastore, api_keys: ApiKeyLookup | None = None) -> None:
        self.datastore = datastore
        self.api_keys = api_keys or no_api_keys
        self._resolvers: dict[str, tuple[RoutePolicy, KeyDigests | None, TenantResolver]] = {}

    def resolver(self, policy: RoutePolicy) -> TenantResolver:
        """The policy's resolver (cached while the policy and its key table are unchanged)."""
        ref = policy.spec.tenancy.api_keys_secret_ref
        table = (self.datastore.api_keys(object_key(policy.metadata.namespace, ref.name))
                 if ref is not None else None)
        key = object_key(policy.metadata.namespace, policy.metadata.name)
        cached = self._resolvers.get(key)
        if cached is None or cached[0] is not policy or cached[1] is not table:
            cached = (policy, table, TenantResolver(policy.spec.tenancy, self.api_keys(policy),
                                                    key_digests=table))
            self._resolvers[key] = cached
        return cached[2]

    def tenant_of(self, policy: RoutePolicy, headers: Mapping[str, str],
                  preset: str | None = None) -> str:
        """The tenant under ``policy``: by API key for ``source: APIKey``; else ``preset``
        (what the entry point already decided: the trusted tenant header, a gRPC caller's
        identity), else the tenant header as it reached the router (the entry points drop an
        untrusted one), else the policy's default tenant."""
        tenancy = policy.spec.tenancy
        if tenancy.source == "APIKey":
            return self.resolver(policy).resolve(headers).name
        return preset or headers.get(tenancy.header) or tenancy.default_tenant

    def forget(self, keep: set[str]) -> None:
        """Drop the resolvers of policies not in ``keep`` (``namespace/name`` keys)."""
        for key in [k for k in self._resolvers if k not in keep]:
            del self._resolvers[key]

"""Tenant resolution by API key (header tenancy is the entry points' job: the loopback test
``test_client_tenant_headers_choose_no_budget_unless_trusted`` covers it end to end)."""

from __future__ import annotations

from kvroute_api.route_policy import TenancySpec
from kvroute_router.admission.tenancy import TenantResolver


def test_header_tenancy_is_not_resolved_from_headers_here() -> None:
    resolver = TenantResolver(TenancySpec())
    resolved = resolver.resolve({"x-kvroute-tenant": "search"})
    assert (resolved.name, resolved.source) == ("anonymous", "default")


def test_api_key_maps_to_tenant_and_ignores_headers() -> None:
    tenancy = TenancySpec.model_validate({"source": "APIKey",
                                          "apiKeysSecretRef": {"name": "keys"},
                                          "defaultTenant": "public"})
    resolver = TenantResolver(tenancy, {"search": "sk-search", "batch": "sk-batch"})
    found = resolver.resolve({"authorization": "Bearer sk-batch",
                              "x-kvroute-tenant": "search"})
    assert (found.name, found.source) == ("batch", "api-key")
    assert resolver.resolve({"authorization": "Bearer nope"}).name == "public"
    assert resolver.resolve({}).name == "public"


def test_the_directory_decides_once_for_every_component() -> None:
    """The budget hook and the response cache share one TenantDirectory: header tenancy takes
    what the entry point decided, then the (already trust-filtered) header, then the default;
    API-key tenancy follows the Secret's digest table as it rotates."""
    from kvroute_router.admission.tenancy import TenantDirectory
    from kvroute_router.datastore.api_keys import digests_of
    from kvroute_router.datastore.store import Datastore

    from tests.unit.router.router_fixtures import make_policy

    store = Datastore()
    header = make_policy("by-header", tenancy={"defaultTenant": "public"})
    keyed = make_policy("by-key", tenancy={"source": "APIKey",
                                           "apiKeysSecretRef": {"name": "keys"}})
    directory = TenantDirectory(store, lambda policy: {"embedded": "sk-emb"})
    assert directory.tenant_of(header, {}) == "public"
    assert directory.tenant_of(header, {"x-kvroute-tenant": "search"}) == "search"
    assert directory.tenant_of(header, {"x-kvroute-tenant": "search"}, "caller") == "caller"

    bearer = {"authorization": "Bearer sk-a", "x-kvroute-tenant": "search"}
    assert directory.tenant_of(keyed, bearer, "caller") == "anonymous"  # the key decides
    assert directory.tenant_of(keyed, {"authorization": "Bearer sk-emb"}) == "embedded"
    store.set_api_keys("default/keys", digests_of({"alice": "sk-a"}))
    assert directory.tenant_of(keyed, bearer) == "alice"
    store.set_api_keys("default/keys", digests_of({"bob": "sk-a"}))  # rotated
    assert directory.tenant_of(keyed, bearer) == "bob"
    directory.forget(keep=set())
    assert directory.tenant_of(keyed, bearer) == "bob"  # rebuilt on demand

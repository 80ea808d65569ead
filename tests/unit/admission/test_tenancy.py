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

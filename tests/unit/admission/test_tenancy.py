"""Tenant resolution: spoofed headers from untrusted clients are ignored; API keys map."""

from __future__ import annotations

from kvroute_api.route_policy import TenancySpec
from kvroute_router.admission.tenancy import TenantResolver


def test_header_is_trusted_only_from_the_gateway() -> None:
    resolver = TenantResolver(TenancySpec())
    headers = {"x-kvroute-tenant": "search"}
    assert resolver.resolve(headers, from_trusted_gateway=True).name == "search"
    spoofed = resolver.resolve(headers, from_trusted_gateway=False)
    assert (spoofed.name, spoofed.source) == ("anonymous", "default")
    assert resolver.untrusted_headers_to_strip() == ("x-kvroute-tenant",)


def test_api_key_maps_to_tenant_and_ignores_headers() -> None:
    tenancy = TenancySpec.model_validate({"source": "APIKey",
                                          "apiKeysSecretRef": {"name": "keys"},
                                          "defaultTenant": "public"})
    resolver = TenantResolver(tenancy, {"search": "sk-search", "batch": "sk-batch"})
    found = resolver.resolve({"authorization": "Bearer sk-batch",
                              "x-kvroute-tenant": "search"}, from_trusted_gateway=False)
    assert (found.name, found.source) == ("batch", "api-key")
    assert resolver.resolve({"authorization": "Bearer nope"},
                            from_trusted_gateway=True).name == "public"
    assert resolver.resolve({}, from_trusted_gateway=True).name == "public"

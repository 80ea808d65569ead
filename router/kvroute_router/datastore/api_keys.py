"""API keys of ``tenancy.source: APIKey`` policies, kept only as SHA-256 digests.

A RoutePolicy's ``spec.tenancy.apiKeysSecretRef`` names a Secret in the policy's namespace
whose data keys are tenants and whose values are their API keys (several keys of one tenant,
e.g. during a rotation, one per line). Sources turn that data into a :data:`KeyDigests` table
(digest → tenant) at once; the plaintext keys are neither stored nor logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

KeyDigests = Mapping[str, str]
"""SHA-256 hex digest of an API key → tenant."""


def api_key_digest(key: str) -> str:
    """The digest a key is stored and looked up by."""
    return hashlib.sha256(key.strip().encode("utf-8")).hexdigest()


def digests_of(tenant_keys: Mapping[str, str]) -> dict[str, str]:
    """{tenant: key(s)} (plaintext, one key per line) → {digest: tenant}."""
    table: dict[str, str] = {}
    for tenant, keys in sorted(tenant_keys.items()):
        for key in keys.splitlines():
            if key.strip():
                table[api_key_digest(key)] = tenant
    return table


def digests_of_secret(secret: Mapping[str, object]) -> dict[str, str]:
    """A Secret object (wire format: base64 ``data``, optional plaintext ``stringData``) →
    {digest: tenant}. Values that are not valid base64 UTF-8 are skipped (by tenant name
    only, never by value)."""
    return digests_of(secret_strings(secret))


def secret_strings(secret: Mapping[str, object]) -> dict[str, str]:
    """A Secret object's data as text: base64 ``data`` decoded, plaintext ``stringData``
    over it; values that are not valid base64 UTF-8 are skipped."""
    plain: dict[str, str] = {}
    data = secret.get("data") or {}
    if isinstance(data, Mapping):
        for tenant, encoded in data.items():
            try:
                plain[str(tenant)] = base64.b64decode(str(encoded), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue
    string_data = secret.get("stringData") or {}
    if isinstance(string_data, Mapping):
        plain.update({str(k): str(v) for k, v in string_data.items()})
    return plain


__all__ = ["KeyDigests", "api_key_digest", "digests_of", "digests_of_secret", "secret_strings"]

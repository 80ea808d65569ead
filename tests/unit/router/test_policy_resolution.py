"""Policy resolution (datastore/resolution.py, docs/security.md): conflicts are refused with an
error naming both policies, never resolved by name order; the operator's ModelConflict
verdict is honoured; the namespace scope selects one namespace's policies."""

from __future__ import annotations

import pytest
from kvroute_router.datastore.resolution import PolicyConflictError
from kvroute_router.datastore.store import Datastore

from tests.unit.router.router_fixtures import make_policy, make_pool


def _in(namespace: str, obj: object) -> object:
    obj.metadata.namespace = namespace  # type: ignore[attr-defined]
    return obj


def _conflict_verdict(policy: object, generation: int = 1) -> object:
    return type(policy).model_validate({  # type: ignore[attr-defined]
        **policy.to_wire(),  # type: ignore[attr-defined]
        "metadata": {"name": policy.metadata.name, "generation": generation},  # type: ignore[attr-defined]
        "status": {"conditions": [{"type": "Accepted", "status": "False",
                                   "reason": "ModelConflict", "observedGeneration": 1,
                                   "message": "model 'chat' is already routed"}]}},
        by_alias=True)


def test_equally_specific_policies_are_a_conflict_naming_both() -> None:
    store = Datastore()
    store.replace([make_pool("a"), make_pool("b")],
                  [make_policy("zzz", pools=[{"name": "a"}]),
                   make_policy("aaa", pools=[{"name": "b"}])])
    with pytest.raises(PolicyConflictError) as err:
        store.resolve("chat", {})
    assert err.value.claimants == ("default/aaa", "default/zzz")
    assert "'default/aaa'" in str(err.value) and "'default/zzz'" in str(err.value)


def test_the_operators_model_conflict_verdict_is_honoured() -> None:
    older = make_policy("zzz", pools=[{"name": "a"}])
    newer = _conflict_verdict(make_policy("aaa", pools=[{"name": "b"}]))
    store = Datastore()
    store.replace([make_pool("a"), make_pool("b")], [older, newer])  # type: ignore[list-item]
    resolution = store.resolve("chat", {})
    assert resolution is not None and resolution.policy_key == "default/zzz"
    # A verdict for an older generation of the spec no longer holds: a conflict again.
    stale = _conflict_verdict(make_policy("aaa", pools=[{"name": "b"}]), generation=2)
    store.replace([make_pool("a"), make_pool("b")], [older, stale])  # type: ignore[list-item]
    with pytest.raises(PolicyConflictError):
        store.resolve("chat", {})


def test_the_scope_selects_the_namespace_and_direct_pools_do_not_mix_namespaces() -> None:
    store = Datastore()
    store.replace([_in("team", make_pool("a")), _in("aaa", make_pool("b"))],  # type: ignore[list-item]
                  [_in("team", make_policy("chat", pools=[{"name": "a"}])),  # type: ignore[list-item]
                   _in("aaa", make_policy("grab", pools=[{"name": "b"}]))])  # type: ignore[list-item]
    resolution = store.resolve("chat", {"x-kvroute-namespace": "team"})
    assert resolution is not None and resolution.policy_key == "team/chat"
    assert store.resolve("chat", {"x-kvroute-namespace": "other"}) is None
    with pytest.raises(PolicyConflictError):
        store.resolve("chat", {})
    store.replace([_in("team", make_pool("a", directAccess=True)),  # type: ignore[list-item]
                   _in("aaa", make_pool("b", directAccess=True))], [])  # type: ignore[list-item]
    with pytest.raises(PolicyConflictError) as err:
        store.resolve("test-model", {})
    assert err.value.claimants == ("aaa/b", "team/a")
    resolution = store.resolve("test-model", {"x-kvroute-namespace": "team"})
    assert resolution is not None and [s.key for s, _ in resolution.pools if s] == ["team/a"]

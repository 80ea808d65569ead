"""Datastore merges keep endpoint state; the config-file source reloads on change and keeps
the last good config when an edit is invalid."""

from __future__ import annotations

from pathlib import Path

import yaml
from kvroute_router.datastore.file_source import ConfigFileSource
from kvroute_router.datastore.store import Datastore, EndpointSpec

from tests.unit.router.router_fixtures import make_policy, make_pool


def test_endpoint_objects_survive_updates_and_listeners_hear_changes() -> None:
    store = Datastore()
    events: list[tuple[list[str], list[str]]] = []
    store.add_listener(lambda a, r: events.append((sorted(e.name for e in a),
                                                   sorted(e.name for e in r))))
    store.replace([make_pool(count=2)], [make_policy()])
    ep = store.pool("default/local").endpoints["local-0"]  # type: ignore[union-attr]
    ep.in_flight = 3
    store.replace([make_pool(count=3)], [make_policy()])
    assert store.pool("default/local").endpoints["local-0"] is ep  # type: ignore[union-attr]
    assert ep.in_flight == 3
    store.set_pool_endpoints("default/local", [EndpointSpec("local-0", "10.0.0.9:8000")])
    assert events == [(["local-0", "local-1"], []), (["local-2"], []),
                      (["local-0"], ["local-0", "local-1", "local-2"])]


def _write(path: Path, count: int) -> None:
    docs = [make_pool(count=count).to_wire(), make_policy().to_wire()]
    path.write_text(yaml.safe_dump_all(docs))


def test_config_file_reload_and_invalid_edit(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    _write(config, 2)
    store = Datastore()
    source = ConfigFileSource(store, [config])
    source.load()
    # "test-model" is served by a pool the policy targets: reachable only as "chat".
    assert len(store.endpoints()) == 2 and store.models() == ["chat"]
    assert not source.check()
    _write(config, 3)
    assert source.check() and len(store.endpoints()) == 3
    config.write_text("apiVersion: kvroute.io/v1alpha1\nkind: InferencePool\nspec: {}\n")
    assert not source.check()
    assert len(store.endpoints()) == 3  # last good config kept

"""Budgets without Redis are shared by the live router replicas (datastore/peers.py,
docs/security.md "Several replicas"): the count follows the router Service's EndpointSlices,
and the ledger's share follows the count."""

from __future__ import annotations

from typing import Any

from kvroute_router.budget.ledger import BudgetLedger
from kvroute_router.datastore.peers import PeerCount, ready_replicas


def _slice(*endpoints: tuple[str, bool | None, bool]) -> dict[str, Any]:
    return {"endpoints": [
        {"addresses": [f"10.0.0.{i}"], "targetRef": {"kind": "Pod", "name": name},
         "conditions": {**({} if ready is None else {"ready": ready}),
                        "terminating": terminating}}
        for i, (name, ready, terminating) in enumerate(endpoints)]}


def test_ready_replicas_counts_distinct_ready_pods_and_itself() -> None:
    slices = [_slice(("r-a", True, False), ("r-b", None, False), ("r-c", False, False),
                     ("r-d", True, True)),
              _slice(("r-a", True, False))]  # dual-stack: the same pod in two slices
    assert ready_replicas(slices, "r-a") == 2
    assert ready_replicas(slices, "r-new") == 3  # starting: about to take traffic
    assert ready_replicas([], None) == 1


async def test_the_ledger_share_follows_the_replica_count() -> None:
    ledger = BudgetLedger()
    listing = [[_slice(("r-a", True, False), ("r-b", True, False))]]

    def follow(replicas: int) -> None:
        ledger.replica_share = 1.0 / replicas

    peers = PeerCount("kvroute-system", "kvroute-router", "r-a", follow,
                      interval_s=3600, lister=lambda: listing[0])
    await peers.start()
    try:
        assert ledger.replica_share == 0.5
        listing[0] = [_slice(("r-a", True, False), ("r-b", True, False),
                             ("r-c", True, False), ("r-d", True, False))]
        peers._apply(peers.measure())  # what the poll thread does every interval
        assert ledger.replica_share == 0.25

        # An unreadable listing (no RBAC) keeps the last share.
        def fail() -> list[dict[str, Any]]:
            raise PermissionError("forbidden")
        peers._lister = fail
        peers._apply(peers.measure())
        assert ledger.replica_share == 0.25
    finally:
        await peers.stop()

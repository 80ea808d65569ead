"""Accounting rules that cannot be gamed (budget/accounting.py, docs/security.md): a refund
only for attempts that provably produced nothing; unverified reports pay the reservation."""

from __future__ import annotations

import pytest
from kvroute_router.budget.accounting import charge_for
from kvroute_router.budget.ledger import RequestEstimate
from kvroute_router.framework.lifecycle import Outcome

ESTIMATE = RequestEstimate(100, 40)


@pytest.mark.parametrize(("dispatched", "outcome", "charged"), [
    (False, Outcome(status=429), None),
    # What the router or Envoy saw.
    (True, Outcome(status=500), None),  # the engine answered an error: nothing generated
    (True, Outcome(status=200, prompt_tokens=90, completion_tokens=12), (90, 12)),
    (True, Outcome(status=499, completion_tokens=5), (100, 5)),  # cancelled stream: counted
    (True, Outcome(status=499), (100, 40)),  # cancelled, usage unknown: the reservation
    (True, Outcome(status=504), (100, 0)),  # no first token in time: the prompt only
    (True, Outcome(status=504, answered=True), (100, 40)),  # deadline mid-answer
    (True, Outcome(status=502, answered=True), (100, 40)),  # engine died mid-answer: no refund
    (True, Outcome(status=200), (100, 40)),
    # Pick reports.
    (True, Outcome(status=0, error="not reported", witness="unverified"), (100, 40)),
    (True, Outcome(status=500, witness="unverified"), (100, 40)),
    (True, Outcome(status=200, prompt_tokens=0, completion_tokens=0, witness="unverified"),
     (100, 40)),
    (True, Outcome(status=200, prompt_tokens=0, completion_tokens=0, witness="caller"), (0, 0)),
    (True, Outcome(status=200, completion_tokens=7, witness="caller"), (100, 7)),
    (True, Outcome(status=500, prompt_tokens=0, completion_tokens=0, witness="caller"),
     (100, 40)),
])
def test_charges(dispatched: bool, outcome: Outcome, charged: tuple[int, int] | None) -> None:
    charge = charge_for(dispatched, outcome, ESTIMATE)
    if charged is None:
        assert charge.refund
    else:
        assert not charge.refund and (charge.prompt_tokens, charge.output_tokens) == charged

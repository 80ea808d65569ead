"""What a finished request is charged: accounting rules that cannot be gamed
(docs/security.md, "Accounting that cannot be gamed").

A reservation is refunded only when the attempt provably produced nothing; otherwise the
request pays its real usage when a trustworthy witness reports it, else the reservation (the
upper bound it was admitted with):

* never dispatched → refund;
* the router or Envoy saw the engine answer an error (≥ 400, not 499/504) with no usage →
  refund: an engine that answers an error generated nothing;
* no first byte before the deadline (504, nothing answered) → the prompt only: the engine may
  have computed the prefill, it generated no token the client saw;
* an answer cut after it had started (the engine died mid-stream; ``Outcome.answered``) with
  no usage → the reservation (streams count their tokens as usage, so they pay those);
* usage known from a trustworthy witness → that usage (cancelled streams: the tokens counted
  up to the cancellation);
* an authenticated Pick caller's Report with a non-error status → the tokens it reports (0: a
  refund); with an error status → the reservation (an error report proves nothing);
* an anonymous Report, a Pick never reported, or a cancellation/timeout with unknown usage →
  the reservation.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute_router.budget.ledger import RequestEstimate
from kvroute_router.framework.lifecycle import Outcome

NO_OUTPUT_STATUSES = range(400, 600)
"""Engine answers that carry no generated output (when no usage came with them)."""
STILL_RUNNING = (499, 504)
"""Cancelled by the client / timed out: the engine may have generated until then."""


@dataclass(frozen=True)
class Charge:
    """Tokens to settle the reservation with (``refund``: cancel it instead)."""

    prompt_tokens: int
    output_tokens: int
    refund: bool = False
    reason: str = ""


def charge_for(dispatched: bool, outcome: Outcome, estimate: RequestEstimate) -> Charge:
    reservation = Charge(estimate.prompt_tokens, estimate.max_output_tokens,
                         reason="reservation")
    if not dispatched:
        return Charge(0, 0, refund=True, reason="not dispatched")
    if outcome.witness == "unverified":
        return reservation
    usage_known = outcome.prompt_tokens is not None or outcome.completion_tokens is not None
    if outcome.witness == "caller":
        if not 200 <= outcome.status < 400 or not usage_known:
            return reservation
    elif not usage_known:
        if outcome.answered:
            return reservation
        if outcome.status == 504:
            return Charge(estimate.prompt_tokens, 0, reason="no first token in time")
        if outcome.status in NO_OUTPUT_STATUSES and outcome.status not in STILL_RUNNING:
            return Charge(0, 0, refund=True, reason=f"engine answered {outcome.status}")
        return reservation
    prompt = (outcome.prompt_tokens if outcome.prompt_tokens is not None
              else estimate.prompt_tokens)
    output = (outcome.completion_tokens if outcome.completion_tokens is not None
              else estimate.max_output_tokens)
    return Charge(prompt, output, reason="usage")


__all__ = ["Charge", "charge_for"]

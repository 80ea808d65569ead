"""Pure helpers for status conditions (metav1.Condition): setting one keeps its
lastTransitionTime unless the status changes, and transitions are reported so the handlers can
post Kubernetes Events for them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionUpdate:
    """A condition the operator computed for an object."""

    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class Transition:
    """A condition whose status changed (or appeared)."""

    type: str
    old_status: str | None
    new_status: str
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(existing: Iterable[dict[str, Any]], updates: Iterable[ConditionUpdate],
                     generation: int | None,
                     now: str | None = None) -> tuple[list[dict[str, Any]], list[Transition]]:
    """New condition list and the transitions it contains. Conditions not updated are kept."""
    stamp = now or now_rfc3339()
    by_type = {c.get("type"): dict(c) for c in existing if isinstance(c, dict)}
    transitions: list[Transition] = []
    for update in updates:
        old = by_type.get(update.type)
        old_status = old.get("status") if old else None
        changed = old_status != update.status
        entry: dict[str, Any] = {
            "type": update.type,
            "status": update.status,
            "reason": update.reason,
            "message": update.message,
            "lastTransitionTime": stamp if changed or not old
            else old.get("lastTransitionTime", stamp),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[update.type] = entry
        if changed:
            transitions.append(Transition(update.type, old_status, update.status,
                                          update.reason, update.message))
    return list(by_type.values()), transitions

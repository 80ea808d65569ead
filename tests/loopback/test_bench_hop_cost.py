"""``bench/hop_cost.py`` measures what it says: every message reaches the receiver process and
each side's CPU is read."""

from __future__ import annotations

import hop_cost
import pytest

pytestmark = pytest.mark.loopback


def test_paced_messages_wake_the_receiver_once_each() -> None:
    run = hop_cost.measure(messages=40, size=100, gap_s=0.002)
    assert run["messages"] == 40 and run["size"] == 100
    assert run["received_bytes"] == 40 * 100
    # 2 ms apart, each message finds the receiver asleep (a stall on a loaded machine can
    # let two arrive together, never more wakes than messages).
    assert 1 <= run["receiver_wakes"] <= 40
    assert run["sender_us_per_message"] > 0
    assert run["receiver_us_per_message"] > 0


def test_back_to_back_messages_all_arrive() -> None:
    run = hop_cost.measure(messages=400, size=100, gap_s=0.0)
    assert run["received_bytes"] == 400 * 100
    assert 1 <= run["receiver_wakes"] <= 400
    assert run["receiver_us_per_message"] > 0

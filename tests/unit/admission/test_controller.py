"""Admission control: sheddable traffic is shed first under saturation; the queue is bounded,
ordered by priority and times out, and refusals are counted by reason. (Token limits are the
director's: tests/unit/router/test_director.py.)"""

from __future__ import annotations

import asyncio

from kvroute_api.route_policy import AdmissionSpec
from kvroute_router.admission.controller import AdmissionController, EndpointLoad
from kvroute_router.budget.metrics import BudgetMetrics
from prometheus_client import CollectorRegistry

CHAT = {"policy_namespace": "default", "policy": "chat"}  # a policy's metric labels

SPEC = AdmissionSpec.model_validate({
    "maxPromptTokens": 100, "maxOutputTokens": 50, "maxQueueDepth": 2, "queueTimeoutMs": 50,
    "saturationQueueDepth": 4,
    "priorityClasses": [{"name": "batch", "priority": -10, "sheddable": True},
                        {"name": "interactive", "priority": 10},
                        {"name": "standard", "priority": 0}],
    "defaultPriorityClass": "standard"})


class Load:
    """Endpoint load the test sets."""

    def __init__(self) -> None:
        self.endpoints = [EndpointLoad(waiting=0, kv_utilization=0.1)]

    def __call__(self) -> list[EndpointLoad]:
        return self.endpoints

    def saturate(self) -> None:
        self.endpoints = [EndpointLoad(4, 0.2), EndpointLoad(0, 0.97)]

    def relieve(self) -> None:
        self.endpoints = [EndpointLoad(0, 0.2)]


def test_priority_classes() -> None:
    controller = AdmissionController("chat", SPEC, Load())
    assert controller.priority_of({"x-kvroute-priority": "batch"}).sheddable
    assert controller.priority_of({}).name == "standard"
    assert controller.priority_of({"x-kvroute-priority": "unknown"}).name == "standard"


async def test_sheddable_is_shed_and_others_queue_under_saturation() -> None:
    load = Load()
    controller = AdmissionController("chat", SPEC, load)
    batch = controller.priority_of({"x-kvroute-priority": "batch"})
    interactive = controller.priority_of({"x-kvroute-priority": "interactive"})
    standard = controller.priority_of({})
    assert await controller.admit(batch) is None  # not saturated: nobody is shed
    load.saturate()
    shed = await controller.admit(batch)
    assert shed is not None and shed.status == 429 and shed.code == "overloaded"
    low = asyncio.create_task(controller.admit(standard))
    high = asyncio.create_task(controller.admit(interactive))
    for _ in range(5):
        await asyncio.sleep(0)
    assert controller.queue_depth == 2
    full = await controller.admit(standard)
    assert full is not None and full.code == "queue_full"
    load.relieve()
    assert controller.release_waiting() == 1
    for _ in range(5):
        await asyncio.sleep(0)
    assert high.done() and high.result() is None and not low.done()
    controller.release_waiting()
    assert await low is None


async def test_queue_timeout_answers_429() -> None:
    load = Load()
    load.saturate()
    registry = CollectorRegistry()
    controller = AdmissionController("chat", SPEC, load, metrics=BudgetMetrics(registry))
    outcome = await controller.admit(controller.priority_of({}))
    assert outcome is not None and outcome.code == "queue_timeout"
    assert registry.get_sample_value("kvroute_admission_rejected_total",
                                     {**CHAT, "reason": "queue_timeout"}) == 1
    assert outcome.headers() == {"retry-after": "1"}
    assert controller.queue_depth == 0

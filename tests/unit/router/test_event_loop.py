"""The event loop the router runs on: ``kvroute router --event-loop`` and
:meth:`~kvroute_router.app.Router.run` (the SIGTERM drain on each loop is in
tests/loopback/test_fault_suite.py)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from kvroute_cli.main import build_parser
from kvroute_router.app import EVENT_LOOPS, Router, RouterSettings, event_loop_name


def test_the_cli_offers_the_routers_event_loops_and_defaults_to_uvloop() -> None:
    args = build_parser().parse_args(["router", "--config", "x.yaml"])
    assert args.event_loop == EVENT_LOOPS[0] == "uvloop"
    for loop in EVENT_LOOPS:
        assert build_parser().parse_args(["router", "--event-loop", loop]).event_loop == loop
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--event-loop", "trio"])


async def _name() -> str:
    return event_loop_name()


def test_event_loop_name_tells_the_running_loop() -> None:
    assert asyncio.run(_name()) == "asyncio"
    assert uvloop.run(_name()) == "uvloop"


def test_an_unknown_event_loop_is_refused_before_anything_starts() -> None:
    router = Router(RouterSettings(config_paths=[], http_port=None, ext_proc_port=None,
                                   grpc_port=None, metrics_port=None))
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        router.run("trio")


async def test_async_tests_run_on_the_routers_default_loop() -> None:
    """tests/conftest.py's loop factories: the unit tier runs on uvloop."""
    assert event_loop_name() == EVENT_LOOPS[0]

"""The official OpenAI SDK as the client of the router's proxy, in front of an emulated fleet
(vLLM-compatible engines on loopback, the test model's tokenizer): completions and chat,
streamed and not, with and without ``stream_options.include_usage``, and an invalid parameter.
The hop to the engines is the router's own HTTP/1.1 client (kvroute_router.http1); many
requests in a row reuse its kept-alive connections."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import yaml
from kvroute_emulator.fleet import EmulatedFleet
from kvroute_router.app import Router, RouterSettings

from tests.emulated import MODEL, fleet_pool

pytestmark = pytest.mark.loopback


@contextlib.asynccontextmanager
async def sdk_client(tmp_path: Path, fleet: EmulatedFleet, model_dir: Path
                     ) -> AsyncIterator[tuple[openai.AsyncOpenAI, Router]]:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all([
        fleet_pool(fleet),
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
         "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "emu"}],
                  "scoring": {"scorers": [{"type": "prefix-precise", "weight": 1},
                                          {"type": "running-requests"}]}}}]))
    router = Router(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                   ext_proc_port=None, grpc_port=None, metrics_port=None,
                                   scrape_interval_s=0.05, config_poll_interval_s=0.05,
                                   tokenizer_dirs={MODEL: model_dir}))
    await router.start()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.ports['http']}/v1",
                                api_key="unused", max_retries=0, timeout=60)
    try:
        yield client, router
    finally:
        await client.close()
        await router.stop()


async def test_completions_and_chat_through_the_sdk(tmp_path: Path, fleet: EmulatedFleet,
                                                    model_dir: Path) -> None:
    async with sdk_client(tmp_path, fleet, model_dir) as (client, router):
        for i in range(6):  # several in a row: kept-alive upstream connections are reused
            done = await client.completions.create(model="chat", prompt=f"hello {i} " * 30,
                                                   max_tokens=3)
            assert done.choices[0].text and done.usage is not None
            assert done.usage.completion_tokens == 3 and done.usage.prompt_tokens > 30

        chat = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "say something"}],
            max_tokens=4)
        assert chat.choices[0].message.content and chat.usage is not None
        assert chat.usage.completion_tokens == 4

        # A stream that asks for usage gets it as the last event; one that does not, does not
        # (the router asks the engine for it to settle the budget and drops it).
        chunks = [c async for c in await client.completions.create(
            model="chat", prompt="stream me " * 20, max_tokens=5, stream=True,
            stream_options={"include_usage": True})]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        plain = [c async for c in await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "stream"}], max_tokens=5,
            stream=True)]
        assert plain and all(c.usage is None for c in plain)
        assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)

        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="chat", prompt="x", max_tokens=-1)
        assert bad.value.status_code == 400
        assert isinstance(bad.value.body, dict) and bad.value.body.get("param") == "max_tokens"

        slots = sum(e.in_flight for e in router.datastore.endpoints())
        assert slots == 0  # nothing leaked

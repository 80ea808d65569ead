"""OpenAI bodies become routing requests; bad bodies name the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pytest
from kvroute_router.framework.request import LLMRequest
from kvroute_router.openai.errors import BadRequestError
from kvroute_router.openai.requests import parse_request, render_chat_prompt
from kvroute_router.rbac import ROUTER_RULES


def request_from_body(body: dict[str, Any], kind: Literal["completions", "chat"],
                      headers: Mapping[str, str]) -> LLMRequest:
    return LLMRequest.from_openai(parse_request(body, kind), headers)


def test_chat_and_completion_bodies() -> None:
    chat = request_from_body({"model": "m", "stream": True, "max_tokens": 5, "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "chat",
        {"x-request-id": "r1"})
    assert chat.prompt_text.startswith("<|system|>sys") and "hi" in chat.prompt_text
    assert chat.stream and chat.max_tokens == 5 and chat.request_id == "r1"
    tokens = request_from_body({"model": "m", "prompt": [1, 2, 3]}, "completions", {})
    assert tokens.token_ids == [1, 2, 3]
    assert render_chat_prompt("nonsense") == ""


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": {"a": 1}}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
])
def test_bad_bodies_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequestError) as err:
        request_from_body(body, "completions", {})
    assert err.value.param == param


def test_router_rbac_rules_are_read_only_policy_rules() -> None:
    for rule in ROUTER_RULES:
        assert set(rule) == {"apiGroups", "resources", "verbs"}
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    resources = {r for rule in ROUTER_RULES for r in rule["resources"]}
    # Secrets: read by name only
    assert resources == {"inferencepools", "routepolicies", "cachetiers", "pods"}

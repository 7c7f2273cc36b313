"""Tool calling through the official `openai` client on a tiny checkpoint in the `roles` chat
format: calls in responses and as streamed deltas, every tool_choice, results sent back, the
400s; and the conformance suite's tool checks (`benchmarks/openai_conformance.py`)."""

import sys
from pathlib import Path

import openai
import pytest
import requests

from glm.chat_format import ASSISTANT, ROLES
from serve_testing import serving

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import openai_conformance as conformance  # noqa: E402

pytestmark = pytest.mark.integration

TOOL_CHECKS = [check.name for check in conformance.checks(None, tools=True)
               if check.parameter in conformance.TOOL_PARAMETERS]
ASK = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(ray_instance, tokenizer, tmp_path_factory):
    with serving(tokenizer, tmp_path_factory.mktemp("serve-roles"), chat_format=ROLES) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def checks(server):
    c = conformance.Conformance(server.url, server.api_key, server.model)
    assert c.tools  # /v1/models says this model has tools
    return c, {check.name: check for check in conformance.checks(c)}


@pytest.mark.parametrize("name", TOOL_CHECKS)
def test_tool_conformance(checks, name):
    checks[1][name].run()


def test_tool_call_valid_rate_is_measured(checks):
    c, by_name = checks
    by_name["tool_choice/required [chat]"].run()
    assert conformance.tool_call_valid_rate(c) == 1.0  # the grammar holds even the tiny random model


def test_forced_calls_stream_as_they_are_answered(client):
    """A named call's arguments, forced valid by the grammar, arrive as argument chunks that
    add up to the non-streamed call (greedy: the same tokens)."""
    body = dict(model="glm-tiny", messages=ASK, tools=conformance.TOOLS, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=conformance.TOOL_MAX_TOKENS)
    choice = client.chat.completions.create(**body).choices[0]
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, choice.finish_reason) == ("function", "get_weather", "tool_calls")
    assert conformance.valid_json(call.function.arguments, conformance.TOOL_SCHEMAS["get_weather"])
    assert call.id.startswith("call_") and choice.message.content is None
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [d for chunk in chunks for c in chunk.choices for d in (c.delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and (d.id is None or d is deltas[0]) for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not any(c.delta.content for chunk in chunks for c in chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_after_a_call_the_reply_ends_or_calls_again(client, tokenizer):
    """A +100 bias on `<|assistant|>` (what separates calls): with parallel_tool_calls false the
    reply still ends after one call (the grammar allows only the end there); allowed, the model
    calls again after every call until max_tokens cuts it, each finished call valid."""
    separator = tokenizer.role_ids[ASSISTANT]
    body = dict(model="glm-tiny", messages=ASK, tools=conformance.TOOLS, tool_choice="required", temperature=0,
                max_tokens=64, logit_bias={str(separator): 100})
    one = client.chat.completions.create(parallel_tool_calls=False, **body).choices[0]
    assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1
    several = client.chat.completions.create(**body).choices[0]
    calls = several.message.tool_calls
    assert several.finish_reason == "length" and len(calls) >= 2
    assert all(conformance.valid_json(c.function.arguments, conformance.TOOL_SCHEMAS[c.function.name])
               for c in calls[:-1]), calls


def test_tool_requests_that_cannot_be_served_are_400_naming_the_parameter(server):
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {server.api_key}"

    def error(route, **body):
        r = http.post(server.url + route, json={"model": server.model, **body}, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert error("/v1/completions", prompt="x", tools=conformance.TOOLS)["code"] == "unsupported_parameter"
    assert error("/v1/chat/completions", messages=ASK, tools=conformance.TOOLS,
                 tool_choice={"type": "function", "function": {"name": "nope"}})["param"] == "tool_choice"
    assert error("/v1/chat/completions", messages=ASK, tool_choice="required")["param"] == "tool_choice"
    orphan = ASK + [{"role": "tool", "tool_call_id": "missing", "content": "1"}]
    assert "answers no earlier tool call" in error("/v1/chat/completions", messages=orphan)["message"]
    assert error("/v1/chat/completions", messages=ASK, functions=[{"name": "f"}])["param"] == "functions"
    broken = [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]
    assert "function 'f'" in error("/v1/chat/completions", messages=ASK, tools=broken,
                                   tool_choice="required")["message"]
    assert error("/v1/chat/completions", messages=ASK, tools=conformance.TOOLS, tool_choice="required",
                 num_beams=2, temperature=0)["param"] == "tool_choice"


def test_tokenize_renders_messages_with_role_tokens(server, client, tokenizer):
    r = requests.post(server.url + "/v1/tokenize", json={"messages": ASK},
                      headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)
    ids = r.json()["tokens"]
    assert set(tokenizer.role_ids.values()) & set(ids)
    done = client.chat.completions.create(model="glm-tiny", messages=ASK, max_tokens=1)
    assert r.json()["count"] == done.usage.prompt_tokens

"""Tool calling through the official `openai` client on a tiny checkpoint in the `roles` chat
format: calls in responses and as streamed deltas, every tool_choice, results sent back, the
400s; and the conformance suite's tool checks (`benchmarks/openai_conformance.py`)."""

import sys
from pathlib import Path

import openai
import pytest
import requests

from glm.chat_format import ROLES, chat_format
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
    rate = conformance.tool_call_valid_rate(c)
    assert rate is not None and 0.0 <= rate <= 1.0  # the tiny random model's arguments: whatever they are


def test_named_call_streamed_and_not(client, tokenizer):
    """The forced header names the function; its arguments are what the model writes (here a
    biased token, three times), as one string or as argument chunks that add up to it."""
    header = chat_format(ROLES, tokenizer).header("get_weather")
    token = tokenizer.encode(" the")[0]
    body = dict(model="glm-tiny", messages=ASK, tools=conformance.TOOLS, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=len(header) + 3, logit_bias={str(token): 100})
    choice = client.chat.completions.create(**body).choices[0]
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather",
                                                                         tokenizer.decode([token] * 3))
    assert call.id.startswith("call_") and choice.message.content is None and choice.finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [d for chunk in chunks for c in chunk.choices for d in (c.delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and (d.id is None or d is deltas[0]) for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not any(c.delta.content for chunk in chunks for c in chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_finished_call_has_finish_reason_tool_calls(client, tokenizer):
    body = dict(model="glm-tiny", messages=ASK, tools=conformance.TOOLS, tool_choice="required", temperature=0,
                max_tokens=32, logit_bias={str(tokenizer.special.eop): 100})  # [eop] right after the header
    choice = client.chat.completions.create(**body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.arguments == ""
    assert choice.message.tool_calls[0].function.name in ("get_weather", "get_time")
    chunks = list(client.chat.completions.create(stream=True, **body))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


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


def test_tokenize_renders_messages_with_role_tokens(server, client, tokenizer):
    r = requests.post(server.url + "/v1/tokenize", json={"messages": ASK},
                      headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)
    ids = r.json()["tokens"]
    assert set(tokenizer.role_ids.values()) & set(ids)
    done = client.chat.completions.create(model="glm-tiny", messages=ASK, max_tokens=1)
    assert r.json()["count"] == done.usage.prompt_tokens

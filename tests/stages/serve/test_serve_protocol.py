"""Request validation without a server: the OpenAI sampling parameters, their ranges, the
refusal of unsupported parameters (naming an alternative), and the settings they decode with."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from glm.chat_format import CHATGLM_6B, ROLES, Message, chat_format
from stages.serve.protocol import (
    UNSUPPORTED, APIError, ChatCompletionRequest, CompletionRequest, TokenizeRequest, chat_messages, chat_prompt,
    tool_plan,
)

USER = [{"role": "user", "content": "hi"}]
VOCAB, CONTEXT = 3000, 256


def chat(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw})


def completion(**kw):
    return CompletionRequest.model_validate({"model": "m", "prompt": "p", **kw})


def answer(error: ValidationError) -> dict:
    """What the replica answers for a validation error (its real FastAPI handler)."""
    from fastapi.exceptions import RequestValidationError

    from stages.serve.app import _validation_error

    errors = [{**e, "loc": ("body", *e["loc"])} for e in error.errors()]
    response = asyncio.run(_validation_error(None, RequestValidationError(errors)))
    assert response.status_code == 400
    return json.loads(response.body)["error"]


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("repetition_penalty", 0), ("repetition_penalty", 11),
    ("min_p", 1.5), ("min_p", -0.1), ("top_logprobs", 21), ("logit_bias", {"5": 100.5}), ("logit_bias", {"x": 1}),
    ("stop_token_ids", "7"), ("stream_options", {"include_usage": True, "colour": 1}),
    ("logit_bias", {str(i): 1 for i in range(1025)}), ("stop_token_ids", list(range(257))),
])
def test_out_of_range_values_are_400_naming_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        chat(**{field: value})
    error = answer(e.value)
    assert error["param"].split(".")[0] == field and field in error["message"]


@pytest.mark.parametrize("body,param", [
    (dict(logit_bias={"3000": 1}), "logit_bias"), (dict(logit_bias={"-1": 1}), "logit_bias"),
    (dict(stop_token_ids=[5, 3000]), "stop_token_ids"),
])
def test_token_ids_must_be_in_the_vocabulary(body, param):
    with pytest.raises(APIError) as e:
        chat(**body).check_ranges(VOCAB, CONTEXT)
    assert e.value.status == 400 and e.value.param == param and "0 to 2999" in e.value.message


def test_logprobs_forms_and_their_conflicts():
    assert chat(logprobs=True, top_logprobs=5).logprobs_count() == 5
    assert chat(logprobs=True).logprobs_count() == 0 and chat().logprobs_count() is None
    assert completion(logprobs=0).logprobs_count() == 0 and completion().logprobs_count() is None
    for request, param in ((chat(top_logprobs=2), "top_logprobs"), (completion(logprobs=2, echo=True), "echo"),
                           (completion(logprobs=1, num_beams=2), "logprobs"),
                           (chat(logprobs=True, num_beams=2), "logprobs")):
        with pytest.raises(APIError) as e:
            request.logprobs_count()
        assert e.value.param == param
    with pytest.raises(ValidationError):
        completion(logprobs=True)  # the chat form is not a count


@pytest.mark.parametrize("param", sorted(UNSUPPORTED))
def test_unsupported_parameters_are_refused_naming_an_alternative(param):
    make = completion if param in ("tools", "tool_choice", "parallel_tool_calls") else chat  # chat has tools
    with pytest.raises(ValidationError) as e:
        make(**{param: 1})
    error = answer(e.value)
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert error["message"] == f"{param!r} is not supported by this server: {UNSUPPORTED[param]}"


def test_null_asks_for_nothing_but_a_typo_is_still_unknown():
    assert chat(tools=None, tool_choice=None, response_format={"type": "text"}).model_dump()["model"] == "m"
    with pytest.raises(ValidationError) as e:
        chat(presence_penality=1)
    assert answer(e.value)["message"] == "unknown parameter 'presence_penality'"


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_response_format_shapes():
    assert chat(response_format={"type": "text"}).response_schema() is None
    assert chat(response_format={"type": "json_object"}).response_schema() == {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    assert chat(response_format=fmt).response_schema() == SCHEMA
    assert completion(response_format=fmt).response_schema() == SCHEMA
    for bad, where in (({"type": "json_schema"}, "response_format"),
                       ({"type": "json_object", "json_schema": fmt["json_schema"]}, "response_format"),
                       ({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}},
                        "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "x": 1}},
                        "response_format.json_schema.x"),
                       ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}},
                        "response_format.json_schema.schema")):
        with pytest.raises(ValidationError) as e:
            chat(response_format=bad)
        assert answer(e.value)["param"] == where, bad


def test_response_format_conflicts_are_400():
    for body, param in ((dict(num_beams=2), "response_format"), (dict(min_tokens=3), "min_tokens")):
        with pytest.raises(APIError) as e:
            chat(response_format={"type": "json_object"}, **body).response_schema()
        assert e.value.status == 400 and e.value.param == param


def test_settings_reach_the_generation_config():
    config = completion(presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, min_p=0.1,
                        logit_bias={"7": -100, "9": 5.5}, stop_token_ids=[11], seed=3, temperature=0.8,
                        ).generation_config(16, 0.95, 0.7, choice=1)
    assert (config.presence_penalty, config.frequency_penalty, config.repetition_penalty, config.min_p) == \
        (0.5, -0.5, 1.2, 0.1)
    assert config.logit_bias == {7: -100.0, 9: 5.5} and config.stop_token_ids == [11] and config.seed == 4
    default = completion().generation_config(16, 0.95, 0.7, choice=0)
    assert (default.presence_penalty, default.frequency_penalty, default.repetition_penalty, default.min_p,
            default.logit_bias) == (0.0, 0.0, 1.0, 0.0, {})


def test_tokenize_takes_a_prompt_or_messages(tokenizer):
    fmt = chat_format(CHATGLM_6B, tokenizer)
    assert TokenizeRequest(prompt="x").ids(tokenizer, fmt) == tokenizer.encode("x")
    assert TokenizeRequest(messages=USER).ids(tokenizer, fmt) == tokenizer.encode("hi")
    roles = chat_format(ROLES, tokenizer)
    assert TokenizeRequest(messages=USER).ids(tokenizer, roles) == roles.prompt([Message("user", "hi")])
    for body in ({}, {"prompt": "x", "messages": USER}):
        with pytest.raises(APIError) as e:
            TokenizeRequest(**body).ids(tokenizer, fmt)
        assert e.value.param == "prompt"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_tool_choice_shapes_the_prompt_and_the_decoding(tokenizer):
    roles = chat_format(ROLES, tokenizer)
    auto = tool_plan(chat(tools=TOOLS), roles)
    assert auto.names == ["get_weather", "get_time"] and [t["name"] for t in auto.tools] == auto.names
    assert auto.prefix_choices == [] and auto.stop_ids == roles.stop_ids()
    assert auto.calls == {} and auto.parallel  # auto: not constrained
    required = tool_plan(chat(tools=TOOLS, tool_choice="required"), roles)
    # the grammar's calls: header text -> parameters schema (None: the function takes none)
    assert required.calls == {"get_weather\n": {"type": "object"}, "get_time\n": None}
    assert required.prefix_choices == [] and required.parallel
    named = tool_plan(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                              parallel_tool_calls=False), roles)
    assert named.calls == {"get_time\n": None} and named.names == ["get_time"] and not named.parallel
    assert named.stop_ids == roles.stop_ids() + [roles.ids["assistant"]]  # one call at most
    none = tool_plan(chat(tools=TOOLS, tool_choice="none"), roles)
    assert none.tools == [] and none.names == [] and none.prefix_choices == [roles.header("")]


@pytest.mark.parametrize("body, fmt, param, match", [
    ({"tools": TOOLS}, CHATGLM_6B, "tools", "no tool role"),
    ({"tool_choice": "required"}, ROLES, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ROLES, "tool_choice",
     "not one of the tools"),
    ({"tools": TOOLS + TOOLS[:1]}, ROLES, "tools", "unique"),
    ({"tools": TOOLS, "tool_choice": "required", "num_beams": 2, "temperature": 0}, ROLES, "tool_choice",
     "beam search"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "min_tokens": 2}, ROLES,
     "min_tokens", "min_tokens cannot be combined"),
])
def test_tool_requests_the_model_cannot_serve_are_400(tokenizer, body, fmt, param, match):
    with pytest.raises(APIError, match=match) as e:
        tool_plan(chat(**body), chat_format(fmt, tokenizer))
    assert e.value.status == 400 and e.value.param == param


def test_tool_messages_need_the_role_format(tokenizer):
    messages = chat_messages(chat(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}]).messages)
    with pytest.raises(APIError, match="no tools") as e:
        chat_prompt(chat_format(CHATGLM_6B, tokenizer), messages)
    assert e.value.param == "messages"
    roles = chat_format(ROLES, tokenizer)
    assert roles.parse(chat_prompt(roles, messages)[:-1])[0][2].name == "get_weather"
    with pytest.raises(ValidationError):  # a function name is a metadata line: no newline
        chat(tools=[{"type": "function", "function": {"name": "a\nb"}}])

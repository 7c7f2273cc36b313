"""OpenAI API conformance: every parameter through the official `openai` client, streamed and not.

    python benchmarks/openai_conformance.py [--checkpoint DIR]            # deploys it on a local Ray
    python benchmarks/openai_conformance.py --url http://127.0.0.1:8000 [--api-key KEY] [--model NAME]
    python benchmarks/openai_conformance.py --only response_format      # one parameter's checks

Each supported parameter is sent to /v1/chat/completions and /v1/completions, streamed and not,
and its effect is checked on what comes back (a stop string cuts the text, a logit bias forces
its token, a presence penalty moves the forced token's logprob by exactly the penalty relative
to every other token, min_p = 1 samples the greedy answer ...); every response and every
streamed chunk must validate as the client's typed model (ChatCompletion, Completion,
ChatCompletionChunk; a streamed completion chunk as Completion with `finish_reason` allowed to be
null, as OpenAI's own stream sends it until the last chunk). Each parameter the server does not implement must be refused with a 400
that names it (`code: unsupported_parameter`), and out-of-range values with a 400 naming the
field. /v1/tokenize, /v1/detokenize and /metrics are checked too. Tool calling is checked
(`tools`, every `tool_choice`, `parallel_tool_calls`, tool results sent back, calls streamed as
deltas) on a model whose chat format has tools (`roles`; /v1/models says so), and must be
refused with a 400 naming `tools` on one without (ChatGLM-6B's format).

Structured output: `response_format` json_object and json_schema (the schemas of `SCHEMAS`,
greedy and seeded sampling, through `create` and the client's `parse` / `stream` helpers);
every json_schema answer is validated against its schema with `jsonschema`.

Prints one line per check, the parity matrix (markdown, what docs/serve.md shows) and, last,
one JSON object: checked, passed, failed (and the failed checks' names),
json_schema_valid_rate (the share of json_schema answers that are complete and validate) and
tool_call_valid_rate (the share of `tool_choice: required` answers, greedy and sampled, one
call or parallel calls allowed, that end with finish_reason "tool_calls" and whose calls'
arguments all validate against their tool's JSON schema; an answer cut by max_tokens counts
as invalid; null on a model without tools). Without --checkpoint or --url it deploys the
newest inference checkpoint under ./runs. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

PROMPT = "The quick brown fox"
ENDPOINTS = ("chat", "chat stream", "completions", "completions stream")
NO_TOOLS = "tool_call_valid_rate: null on a model without tools (the ChatGLM-6B chat format)"
STRUCTURED_MAX_TOKENS = 200
"""Budget of a structured answer (every schema of SCHEMAS bounds its strings, arrays and numbers)."""
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                       "member": {"type": "boolean"}},
        "required": ["name", "age", "member"], "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "paid", "shipped"]},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "properties": {"sku": {"enum": ["A1", "B2", "C3"]},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"], "additionalProperties": False}},
            "note": {"anyOf": [{"type": "string", "maxLength": 24}, {"type": "null"}]},
            "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25},
        },
        "required": ["status", "items", "note", "total"], "additionalProperties": False,
    },
    "refs": {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                              "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"},
                       "label": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
        "required": ["start", "end", "label"], "additionalProperties": False,
    },
}
"""The json_schema checks' schemas: nested objects, enums, arrays, anyOf with null, $refs, a
pattern, integers and a number, bounded by multipleOf (the digits of a plain number never have
to end) with a step exact in binary: jsonschema checks multipleOf in floats (1.11 / 0.01 is
not a whole number there, so 0.01 would fail right answers)."""
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, CLOCK]
"""The tools of the tool checks, in OpenAI's strict style (`additionalProperties: false`) and
bounded like SCHEMAS (`maxLength`): under `tool_choice` required or a named function the
arguments are grammar-constrained, and a weak model could otherwise write one string, or new
keys, until max_tokens. Short: the tests' tiny model has a 256-token context."""
TOOL_MAX_TOKENS = 72
"""Budget of a forced tool call: enough for the longest get_weather call (header, braces, key
and 16 characters even at 3 byte tokens each), within what the tests' tiny model leaves after
the tool definitions in its 256-token context."""
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
"""What a function defined without `parameters` takes (OpenAI: an empty parameter list)."""
TOOL_SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", NO_PARAMETERS) for t in TOOLS}
"""Each tool's arguments schema, by name."""
TOOL_PARAMETERS = ("tools", "tool_choice", "parallel_tool_calls", "role: tool messages")


@dataclass
class Answer:
    """What one request returned, per choice, whether streamed or not."""

    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    """The generated tokens' strings, from the logprobs (when asked for)."""
    steps: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    """Per generated token: token string -> logprob of the top alternatives and the chosen token."""
    token_bytes: dict[int, list[int]] = field(default_factory=dict)
    offsets: dict[int, list[int]] = field(default_factory=dict)
    calls: dict[int, list[dict]] = field(default_factory=dict)
    """Tool calls per choice: {id, name, arguments} (streamed ones assembled from their deltas)."""
    usage: object = None

    @property
    def text(self) -> str:
        return self.texts.get(0, "")


@dataclass
class Check:
    name: str
    parameter: str
    endpoint: str
    """One of ENDPOINTS, or the route it checks."""
    kind: str
    """'supported' (the parameter works), 'refused' (not implemented: a 400 naming it) or 'range'
    (a bad value: a 400 naming it; the matrix shows these only when they fail)."""
    run: Callable[[], None]


class Conformance:
    """The checks against one endpoint."""

    def __init__(self, url: str, api_key: str, model: str | None = None):
        import openai
        import requests

        self.url, self.api_key = url.rstrip("/"), api_key
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=300)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {api_key}"
        info = self.client.models.list().data[0]
        self.model = model or info.id
        self.tools = bool(info.to_dict().get("tools", False))
        """Whether the model's chat format has tools (an extension field of /v1/models)."""
        self.tool_answers: list[bool] = []
        """One entry per `tool_choice: required` answer: ended as calls, all of them valid."""
        self.forced = self.tokenize(" the", special=False)[0]
        """A token id the bias checks force (the first token of ' the')."""
        self.forced_text = self.detokenize([self.forced])
        self.schema_answers: list[bool] = []
        """One entry per json_schema answer: complete and valid under its schema."""

    # --- requests ------------------------------------------------------------------------

    def post(self, route: str, body: dict) -> dict:
        r = self.http.post(self.url + route, json={"model": self.model, **body}, timeout=300)
        assert r.status_code == 200, f"{route}: {r.status_code} {r.text[:300]}"
        return r.json()

    def tokenize(self, prompt: str, special: bool = True) -> list[int]:
        return self.post("/v1/tokenize", {"prompt": prompt, "add_special_tokens": special})["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        return self.post("/v1/detokenize", {"tokens": tokens})["prompt"]

    def ask(self, endpoint: str, **params) -> Answer:
        """One request through the client; every response or chunk is validated as the client's
        typed model. `endpoint` is one of ENDPOINTS."""
        from openai.types import Completion
        from openai.types.chat import ChatCompletion

        chat, stream = endpoint.startswith("chat"), endpoint.endswith("stream")
        create = self.client.chat.completions if chat else self.client.completions
        if chat and "logprobs" in params:  # the parameter in the chat form: a flag + a count
            count = params.pop("logprobs")
            params.update(logprobs=True, top_logprobs=count)
        known = inspect.signature(create.create).parameters  # the rest (extensions ...) goes in extra_body
        extra = {k: params.pop(k) for k in list(params) if k not in known}
        body = dict(model=self.model, extra_body=extra or None, **params)
        if chat:
            body["messages"] = params.pop("messages", None) or [{"role": "user", "content": PROMPT}]
        else:
            body.setdefault("prompt", PROMPT)
        answer = Answer()
        if not stream:
            raw = create.with_raw_response.create(**body)
            data = raw.http_response.json()
            parsed = (ChatCompletion if chat else Completion).model_validate(data)
            for choice in parsed.choices:
                self._add(answer, choice.index, choice.message.content if chat else choice.text, choice.finish_reason,
                          choice.logprobs, chat)
                for call in (choice.message.tool_calls or []) if chat else []:
                    answer.calls.setdefault(choice.index, []).append(
                        {"id": call.id, "name": call.function.name, "arguments": call.function.arguments})
            answer.usage = parsed.usage
            return answer
        for chunk in create.create(stream=True, **body):
            chunk = (type(chunk) if chat else _CompletionChunk).model_validate(chunk.to_dict())  # validated
            if chunk.usage is not None:
                answer.usage = chunk.usage
            for choice in chunk.choices:
                self._add(answer, choice.index, choice.delta.content if chat else choice.text, choice.finish_reason,
                          choice.logprobs, chat)
                for call in (choice.delta.tool_calls or []) if chat else []:
                    calls = answer.calls.setdefault(choice.index, [])
                    if call.id:  # a call starts: id, type and name come once
                        assert call.index == len(calls) and call.function.name, call
                        calls.append({"id": call.id, "name": call.function.name, "arguments": ""})
                    calls[call.index]["arguments"] += call.function.arguments or ""
        return answer

    @staticmethod
    def _add(answer: Answer, i: int, text: str | None, finish: str | None, logprobs, chat: bool) -> None:
        answer.texts[i] = answer.texts.get(i, "") + (text or "")
        if finish:
            answer.finish[i] = finish
        if logprobs is None:
            return
        tokens, steps = answer.tokens.setdefault(i, []), answer.steps.setdefault(i, [])
        if chat:
            for entry in logprobs.content or []:
                tokens.append(entry.token)
                steps.append({**{t.token: t.logprob for t in entry.top_logprobs}, entry.token: entry.logprob})
                answer.token_bytes.setdefault(i, []).extend(entry.bytes or [])
        else:
            tokens += logprobs.tokens
            steps += [dict(top) for top in logprobs.top_logprobs]
            answer.offsets.setdefault(i, []).extend(logprobs.text_offset)

    def refused(self, endpoint: str, param: str, code: str | None = None, **params) -> None:
        """The request must be answered 400 naming `param` (and `code` when given)."""
        import openai

        try:
            self.ask(endpoint, max_tokens=2, **params)
        except openai.BadRequestError as e:
            assert e.param == param, f"the 400 names {e.param!r}, not {param!r}: {e.message}"
            assert code is None or e.code == code, f"code {e.code!r}, expected {code!r}: {e.message}"
            return
        raise AssertionError(f"{param} was accepted; it should be refused with 400")


def _completion_chunk_type():
    """The client's Completion with finish_reason optional: what a streamed completion chunk is."""
    from typing import Literal, Optional

    from openai.types import Completion, CompletionChoice

    class ChunkChoice(CompletionChoice):
        finish_reason: Optional[Literal["stop", "length", "content_filter"]] = None

    class CompletionChunk(Completion):
        choices: list[ChunkChoice]

    return CompletionChunk


_CompletionChunk = _completion_chunk_type()


# --- the checks ------------------------------------------------------------------------------

GREEDY = {"temperature": 0}
REFUSED = {  # OpenAI parameters this server does not implement, with a value a client would send
    "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "store": True,
    "metadata": {"k": "v"},
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
}
REFUSED_COMPLETIONS = {"best_of": 2, "suffix": " and then", "tools": TOOLS, "tool_choice": "auto",
                       "parallel_tool_calls": False}
BAD_VALUES = [  # (matrix row, parameter the 400 must name, request parameters, endpoints)
    ("presence_penalty", "presence_penalty", {"presence_penalty": 2.5}, ENDPOINTS),
    ("frequency_penalty", "frequency_penalty", {"frequency_penalty": -3}, ENDPOINTS),
    ("repetition_penalty", "repetition_penalty", {"repetition_penalty": 0}, ENDPOINTS),
    ("min_p", "min_p", {"min_p": 1.5}, ENDPOINTS),
    ("logit_bias", "logit_bias", {"logit_bias": {"10000000": 1}}, ENDPOINTS),
    ("logit_bias", "logit_bias.1", {"logit_bias": {"1": 101}}, ENDPOINTS),
    ("stop_token_ids", "stop_token_ids", {"stop_token_ids": [-1]}, ENDPOINTS),
    ("logprobs", "logprobs", {"logprobs": 21}, ("completions",)),
    ("logprobs", "top_logprobs", {"logprobs": 21}, ("chat",)),
    ("logprobs", "top_logprobs", {"top_logprobs": 2}, ("chat",)),
    ("logprobs", "logprobs", {"logprobs": 2, "num_beams": 2, "temperature": 0}, ("chat", "completions")),
    ("logprobs", "echo", {"logprobs": 2, "echo": True}, ("completions",)),
    ("stream_options", "stream_options", {"stream_options": {"include_usage": True}}, ("chat", "completions")),
    ("seed", "seed", {"seed": -1}, ENDPOINTS),
    ("response_format", "response_format.json_schema.schema",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}}},
     ENDPOINTS),
    ("response_format", "response_format", {"response_format": {"type": "json_schema"}}, ("chat", "completions")),
    ("response_format", "response_format", {"response_format": {"type": "json_object"}, "num_beams": 2,
                                            "temperature": 0}, ("chat", "completions")),
]


def valid_json(text: str, schema: dict) -> bool:
    """Whether `text` is one JSON document valid under `schema`."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def checks(c: Conformance | None, tools: bool | None = None) -> list[Check]:
    """Every check against the endpoint behind `c`. Nothing is sent (and `c` is not used) until
    a check runs, so `checks(None)` lists them. Tool calling is checked as supported when the
    model has tools (`tools`, default: what the server says; without a server: no)."""
    out: list[Check] = []
    tools = (c is not None and c.tools) if tools is None else tools

    def add(parameter: str, endpoints, fn: Callable[[str], None], kind: str = "supported", name: str = "") -> None:
        for endpoint in endpoints:
            label = f"{parameter}{'/' + name if name else ''} [{endpoint}]"
            out.append(Check(label, parameter, endpoint, kind, lambda e=endpoint: fn(e)))

    def max_tokens(e):
        a = c.ask(e, max_tokens=5, min_tokens=5, **GREEDY)
        assert a.usage is None or a.usage.completion_tokens == 5, a.usage
        assert a.finish[0] == "length", a.finish

    def greedy(e):
        assert c.ask(e, max_tokens=8, **GREEDY).text == c.ask(e.replace(" stream", ""), max_tokens=8, **GREEDY).text

    def sampled_like_greedy(**params):
        def check(e):
            want = c.ask(e, max_tokens=8, min_tokens=8, **GREEDY).text
            got = c.ask(e, max_tokens=8, min_tokens=8, temperature=1.0, seed=3, **params).text
            assert got == want, f"{params} sampled {got!r}, greedy gives {want!r}"
        return check

    def seed(e):
        body = dict(max_tokens=10, min_tokens=10, temperature=1.0, top_p=1.0, seed=42)
        first = c.ask(e, **body).text
        assert c.ask(e.replace(" stream", ""), **body).text == first
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(3) as pool:  # beside other rows of the batch: the same sample
            others = [pool.submit(c.ask, "completions", max_tokens=12, temperature=1.0) for _ in range(2)]
            again = pool.submit(c.ask, e, **body)
            [o.result() for o in others]
            assert again.result().text == first

    def n(e):
        a = c.ask(e, n=2, max_tokens=4, temperature=1.0, seed=5)
        assert sorted(a.texts) == [0, 1] and sorted(a.finish) == [0, 1], a.texts

    def stop(e):
        text = c.ask(e, max_tokens=16, min_tokens=16, **GREEDY).text
        assert len(text) >= 4, f"too short to cut: {text!r}"
        s = text[len(text) // 2:len(text) // 2 + 2]
        a = c.ask(e, max_tokens=16, min_tokens=16, stop=[s], **GREEDY)
        assert a.text == text[:text.index(s)] and a.finish[0] == "stop", (a.text, s, text)

    def stop_token_ids(e):
        a = c.ask(e, max_tokens=4, logit_bias={str(c.forced): 100}, stop_token_ids=[c.forced], **GREEDY)
        assert a.text == "" and a.finish[0] == "stop", (a.text, a.finish)

    def logit_bias(e):
        a = c.ask(e, max_tokens=4, logit_bias={str(c.forced): 100}, **GREEDY)
        assert a.text == c.detokenize([c.forced] * 4), a.text

    def shift(param: str, value: float, per_use: bool):
        """With the forced token t generated j times, every other token's logprob relative to
        t's rises by exactly the penalty (value, or value x j for the frequency penalty)."""
        def check(e):
            body = dict(max_tokens=3, logit_bias={str(c.forced): 100}, logprobs=5, **GREEDY)
            base, pen = c.ask(e, **body), c.ask(e, **body, **{param: value})
            t = c.forced_text
            for j in (1, 2):
                b, p = base.steps[0][j], pen.steps[0][j]
                others = (set(b) & set(p)) - {t}
                assert others, "no common alternatives to compare"
                for u in others:
                    moved = (p[u] - p[t]) - (b[u] - b[t])
                    want = value * (j if per_use else 1)
                    assert abs(moved - want) < 1e-3, f"step {j}: {u!r} moved {moved:.5f} relative to t, not {want}"
        return check

    def repetition(e):
        """Every alternative that is not in the sequence moves by the same amount relative to the
        forced (repeated) token, which loses: the penalty pushes a token already used down."""
        body = dict(max_tokens=3, logit_bias={str(c.forced): 100}, logprobs=5, **GREEDY)
        base, pen = c.ask(e, **body), c.ask(e, **body, repetition_penalty=1.5)
        ids = c.tokenize(PROMPT) + [c.forced]
        seen = {c.detokenize([i]) for i in ids}
        t = c.forced_text
        b, p = base.steps[0][2], pen.steps[0][2]
        moved = [(b[t] - b[u]) - (p[t] - p[u]) for u in (set(b) & set(p)) - seen]
        assert moved and max(moved) - min(moved) < 1e-3 and moved[0] > 0, moved

    def logprobs(e):
        a = c.ask(e, max_tokens=6, min_tokens=6, logprobs=3, **GREEDY)
        steps, tokens = a.steps[0], a.tokens[0]
        assert len(steps) == len(tokens) == 6, (len(steps), len(tokens))
        for token, step in zip(tokens, steps):
            assert 3 <= len(step) <= 4 and step[token] == max(step.values()), step  # greedy: the chosen is the top
            assert all(v <= 0 for v in step.values())
        if e.startswith("chat"):
            assert bytes(a.token_bytes[0]).decode("utf-8", "replace") == a.text
        else:
            assert a.offsets[0][0] == 0 and a.offsets[0] == sorted(a.offsets[0])
        whole = c.ask(e.replace(" stream", ""), max_tokens=6, min_tokens=6, logprobs=3, **GREEDY)
        assert whole.steps[0] == steps  # streamed logprobs add up to the whole answer's

    def include_usage(e):
        a = c.ask(e, max_tokens=3, min_tokens=3, stream_options={"include_usage": True}, **GREEDY)
        assert a.usage is not None and a.usage.completion_tokens == 3, a.usage

    def accepted(**params):
        def check(e):
            assert c.ask(e, max_tokens=2, **params).finish[0] in ("stop", "length")
        return check

    def echo(e):
        assert c.ask(e, max_tokens=3, echo=True, **GREEDY).text.startswith(PROMPT)

    def max_completion_tokens(e):
        a = c.ask(e, max_completion_tokens=3, min_tokens=3, **GREEDY)
        assert a.finish[0] == "length" and (a.usage is None or a.usage.completion_tokens == 3), a.usage

    def min_tokens(e):
        a = c.ask(e, max_tokens=7, min_tokens=7, **GREEDY)
        assert a.finish[0] == "length" and (a.usage is None or a.usage.completion_tokens == 7)

    def beams(e):
        a = c.ask(e, max_tokens=6, num_beams=3, length_penalty=0.5, **GREEDY)
        assert a.finish[0] in ("stop", "length")

    def no_repeat(e):
        a = c.ask(e, max_tokens=8, logit_bias={str(c.forced): 100}, no_repeat_ngram_size=2, logprobs=0, **GREEDY)
        pairs = list(zip(a.tokens[0], a.tokens[0][1:]))
        assert len(pairs) == len(set(pairs)), a.tokens[0]

    def json_object(e):
        """Any JSON object bounds nothing (a weak model may write one string, or members, until
        max_tokens), so a bias makes closing strings (+10 on '"') and then objects (+6 on '}':
        less, or a '}' inside a string would win over closing it) likely, and -100 on ',' keeps
        objects to one member (the smoke model otherwise wrote `"": ""` pairs until max_tokens);
        it is a JSON object."""
        bias = {str(c.tokenize(ch, special=False)[0]): b for ch, b in (('"', 10), ("}", 6), (",", -100))}
        a = c.ask(e, max_tokens=STRUCTURED_MAX_TOKENS, response_format={"type": "json_object"}, logit_bias=bias,
                  **GREEDY)
        assert a.finish[0] == "stop" and isinstance(json.loads(a.text), dict), (a.finish, a.text)

    def json_schema(name: str, **sampling):
        def check(e):
            schema = SCHEMAS[name]
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            a = c.ask(e, max_tokens=STRUCTURED_MAX_TOKENS, response_format=fmt, **sampling)
            valid = a.finish[0] == "stop" and valid_json(a.text, schema)
            c.schema_answers.append(valid)
            assert valid, (a.finish, a.text)
        return check

    def parse(e):
        """The client's own structured-output helpers: a pydantic model in, a parsed instance out."""
        pet = _pet_model()
        messages = [{"role": "user", "content": "Describe a pet."}]
        body = dict(model=c.model, messages=messages, response_format=pet, max_tokens=STRUCTURED_MAX_TOKENS,
                    temperature=0)
        message = None
        try:  # the helpers raise when the answer is cut by max_tokens or does not validate
            if e == "chat":
                message = c.client.chat.completions.parse(**body).choices[0].message
            else:
                with c.client.chat.completions.stream(**body) as stream:
                    message = stream.get_final_completion().choices[0].message
        finally:
            c.schema_answers.append(message is not None and isinstance(message.parsed, pet))
        assert isinstance(message.parsed, pet), message

    add("max_tokens", ENDPOINTS, max_tokens)
    add("max_completion_tokens", ("chat", "chat stream"), max_completion_tokens)
    add("temperature", ENDPOINTS, greedy)
    add("top_p", ENDPOINTS, sampled_like_greedy(top_p=1e-6))
    add("top_k", ENDPOINTS, sampled_like_greedy(top_k=1))
    add("min_p", ENDPOINTS, sampled_like_greedy(min_p=1.0))
    add("seed", ENDPOINTS, seed)
    add("n", ENDPOINTS, n)
    add("stop", ENDPOINTS, stop)
    add("stop_token_ids", ENDPOINTS, stop_token_ids)
    add("logit_bias", ENDPOINTS, logit_bias)
    add("presence_penalty", ENDPOINTS, shift("presence_penalty", 1.5, per_use=False))
    add("frequency_penalty", ENDPOINTS, shift("frequency_penalty", 0.75, per_use=True))
    add("repetition_penalty", ENDPOINTS, repetition)
    add("logprobs", ENDPOINTS, logprobs)
    add("stream_options", ("chat stream", "completions stream"), include_usage)
    add("user", ENDPOINTS, accepted(user="conformance-check"))
    add("safety_identifier", ENDPOINTS, accepted(safety_identifier="conformance-check"))
    add("echo", ("completions", "completions stream"), echo)
    add("min_tokens", ENDPOINTS, min_tokens)
    add("num_beams", ENDPOINTS, beams)
    add("no_repeat_ngram_size", ENDPOINTS, no_repeat)
    add("response_format", ENDPOINTS, accepted(response_format={"type": "text"}), name="text")
    add("response_format", ENDPOINTS, json_object, name="json_object")
    for schema_name in SCHEMAS:
        add("response_format", ENDPOINTS, json_schema(schema_name, **GREEDY), name=f"json_schema {schema_name}")
        add("response_format", ENDPOINTS, json_schema(schema_name, temperature=1.0, seed=11),
            name=f"json_schema {schema_name} sampled")
    add("response_format", ("chat", "chat stream"), parse, name="client parse")
    add("an unsupported parameter as null", ENDPOINTS, accepted(functions=None))
    if tools:
        _tool_checks(c, add)
    else:  # ChatGLM-6B's format has no tool role: a 400 naming tools, whatever else comes with them
        for param, extra in (("tools", {}), ("tool_choice", {"tool_choice": "required"}),
                             ("parallel_tool_calls", {"parallel_tool_calls": False})):
            add(param, ("chat", "chat stream"), lambda e, x=extra: c.refused(e, "tools", "unsupported_parameter",
                                                                             tools=TOOLS, **x), kind="refused")
    for param, value in REFUSED.items():
        add(param, ENDPOINTS, lambda e, p=param, v=value: c.refused(e, p, "unsupported_parameter", **{p: v}),
            kind="refused")
    for param, value in REFUSED_COMPLETIONS.items():
        add(param, ("completions", "completions stream"),
            lambda e, p=param, v=value: c.refused(e, p, "unsupported_parameter", **{p: v}), kind="refused")
    for row, param, params, endpoints in BAD_VALUES:
        add(row, endpoints, lambda e, p=param, b=params: c.refused(e, p, **b), kind="range", name=f"bad {param}")
    add("/v1/tokenize", ("/v1/tokenize",), lambda e: _tokenize(c))
    add("/v1/detokenize", ("/v1/detokenize",), lambda e: _detokenize(c))
    add("/metrics", ("/metrics",), lambda e: _metrics(c))
    return out


def _pet_model():
    """A pydantic model for the client's `parse` helper (its strict JSON schema is sent)."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=16)
        kind: Literal["cat", "dog", "fox"]
        age: int = Field(ge=0, le=30)

    return Pet


def _tool_checks(c: Conformance, add) -> None:
    """Tool calling on a model whose chat format has tools (chat endpoints, streamed and not)."""
    chat = ("chat", "chat stream")

    def auto(e, **params):
        a = c.ask(e, max_tokens=8, tools=TOOLS, **params, **GREEDY)
        assert a.finish[0] in ("stop", "length", "tool_calls"), a.finish
        assert all(call["name"] in TOOL_SCHEMAS for call in a.calls.get(0, [])), a.calls

    def calls_valid(a: Answer) -> bool:
        """Ended after its calls (not cut by max_tokens), each with arguments valid under its tool."""
        calls = a.calls.get(0, [])
        return (a.finish[0] == "tool_calls" and bool(calls) and all(call["id"] for call in calls)
                and all(call["name"] in TOOL_SCHEMAS and valid_json(call["arguments"], TOOL_SCHEMAS[call["name"]])
                        for call in calls))

    def choice(kind, **sampling):
        def check(e):
            value = {"type": "function", "function": {"name": "get_time"}} if kind == "named" else kind
            budget = 24 if kind == "none" else TOOL_MAX_TOKENS
            a = c.ask(e, max_tokens=budget, tools=TOOLS, tool_choice=value, **(sampling or GREEDY))
            calls = a.calls.get(0, [])
            if kind == "none":
                assert not calls and a.finish[0] in ("stop", "length"), (calls, a.finish)
                return
            valid = calls_valid(a)
            if kind == "required":
                c.tool_answers.append(valid)
            assert valid, (a.finish, calls)
            assert kind != "named" or all(call["name"] == "get_time" for call in calls), calls
        return check

    def one_call(e):
        a = c.ask(e, max_tokens=TOOL_MAX_TOKENS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  **GREEDY)
        valid = calls_valid(a)
        c.tool_answers.append(valid)
        assert valid and len(a.calls[0]) == 1, (a.finish, a.calls)

    def results_back(e):
        messages = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
        a = c.ask(e, max_tokens=4, tools=TOOLS, messages=messages, **GREEDY)
        assert a.finish[0] in ("stop", "length", "tool_calls"), a.finish

    add("tools", chat, auto)
    add("tool_choice", chat, lambda e: auto(e, tool_choice="auto"), name="auto")
    for kind in ("none", "required", "named"):
        add("tool_choice", chat, choice(kind), name=kind)
    add("tool_choice", chat, choice("required", temperature=1.0, seed=11), name="required sampled")
    add("parallel_tool_calls", chat, one_call)
    add("role: tool messages", chat, results_back)


def tool_call_valid_rate(c: Conformance | None) -> float | None:
    """Share of `tool_choice: required` answers that ended as calls with arguments valid under
    their tools' schemas (None when none was checked: a model without tools)."""
    if c is None or not c.tool_answers:
        return None
    return round(sum(c.tool_answers) / len(c.tool_answers), 4)


def _tokenize(c: Conformance) -> None:
    """The count is the usage.prompt_tokens of the same input; messages go through the chat prompt."""
    done = c.client.completions.create(model=c.model, prompt=PROMPT, max_tokens=1)
    got = c.post("/v1/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    assert got["count"] == len(got["tokens"]) == len(got["token_strs"]) == done.usage.prompt_tokens, got
    assert got["max_model_len"] > got["count"]
    chat = c.client.chat.completions.create(model=c.model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=1)
    assert c.post("/v1/tokenize", {"messages": [{"role": "user", "content": PROMPT}]})["count"] == \
        chat.usage.prompt_tokens
    r = c.http.post(c.url + "/v1/tokenize", json={"model": c.model}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def _detokenize(c: Conformance) -> None:
    assert c.detokenize(c.tokenize("话说天下大势 Ünïcödé", special=False)) == "话说天下大势 Ünïcödé"
    r = c.http.post(c.url + "/v1/detokenize", json={"model": c.model, "tokens": [10**9]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text


def _metrics(c: Conformance) -> None:
    """Prometheus text that parses, with every series, counting what was just generated."""
    from prometheus_client.parser import text_string_to_metric_families

    import requests

    def scrape() -> dict[tuple, float]:
        """Sample values summed by (name, route, status) (route and status: only on the request counter)."""
        r = requests.get(c.url + "/metrics", timeout=60)  # no key: open, like /health
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.status_code
        samples: dict[tuple, float] = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                key = (s.name, s.labels.get("route"), s.labels.get("status"))
                samples[key] = samples.get(key, 0.0) + s.value
        return samples

    before = scrape()
    c.ask("completions", max_tokens=4, min_tokens=4, temperature=0)
    after = scrape()
    for name in ("glm_serve_requests_waiting", "glm_serve_requests_running", "glm_serve_generation_tokens_per_second",
                 "glm_serve_time_to_first_token_seconds_count", "glm_serve_time_per_output_token_seconds_count"):
        assert (name, None, None) in after, f"{name} missing from /metrics"
    # with one replica both scrapes see the same counters (with several, each scrape sees one replica's)
    tokens = ("glm_serve_generation_tokens_total", None, None)
    assert after[tokens] >= before.get(tokens, 0) + 4, (before.get(tokens), after[tokens])
    assert after.get(("glm_serve_http_requests_total", "/v1/completions", "200"), 0) >= 1


def run_checks(c: Conformance, log=print, only: str | None = None) -> list[tuple[Check, str | None]]:
    """Run every check (those of the parameter `only`, when given); returns (check, error
    message or None)."""
    results = []
    for check in checks(c):
        if only is not None and check.parameter != only:
            continue
        try:
            check.run()
            error = None
        except Exception as e:  # noqa: BLE001 - a failed check, reported
            error = f"{type(e).__name__}: {e}"
            if not isinstance(e, AssertionError):
                error += "\n" + traceback.format_exc(limit=3)
        log(f"{'ok  ' if error is None else 'FAIL'} {check.name}" + (f"\n     {error}" if error else ""))
        results.append((check, error))
    return results


def matrix(results: list[tuple[Check, str | None]]) -> str:
    """Markdown: one row per parameter, one column per endpoint: supported, refused (400), FAIL
    (any of its checks failed, range checks included), or -."""
    rows: dict[str, dict[str, str]] = {}
    for check, error in results:
        if check.endpoint.startswith("/"):
            continue
        cell = rows.setdefault(check.parameter, {})
        if error is not None:
            cell[check.endpoint] = "FAIL"
        elif check.kind != "range" and cell.get(check.endpoint) != "FAIL":
            cell[check.endpoint] = "refused (400)" if check.kind == "refused" else "supported"
    lines = ["| parameter | " + " | ".join(ENDPOINTS) + " |", "|---" * (len(ENDPOINTS) + 1) + "|"]
    for parameter, cells in rows.items():
        lines.append(f"| `{parameter}` | " + " | ".join(cells.get(e, "-") for e in ENDPOINTS) + " |")
    routes = sorted({c.endpoint for c, _ in results if c.endpoint.startswith("/")})
    for route in routes:
        ok = all(err is None for c, err in results if c.endpoint == route)
        cells = ["supported" if ok else "FAIL"] + ["-"] * (len(ENDPOINTS) - 1)
        lines.append(f"| `{route}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: list[tuple[Check, str | None]], url: str, checkpoint: str | None = None,
            schema_answers: list[bool] | None = None, c: Conformance | None = None) -> dict:
    """The last JSON line; `schema_answers`: one entry per json_schema answer (valid or not)."""
    failed = [check.name for check, error in results if error is not None]
    rate = round(sum(schema_answers) / len(schema_answers), 4) if schema_answers else None
    return {"benchmark": "openai_conformance", "url": url, "checkpoint": checkpoint, "checked": len(results),
            "passed": len(results) - len(failed), "failed": len(failed), "failed_checks": failed,
            "json_schema_valid_rate": rate, "json_schema_answers": len(schema_answers or []),
            "tool_call_valid_rate": tool_call_valid_rate(c), "tool_call_answers": len(c.tool_answers if c else []),
            **({} if c is not None and c.tools else {"note": NO_TOOLS})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="inference checkpoint to deploy (default: the newest under ./runs)")
    parser.add_argument("--url", help="an endpoint that is already running (nothing is deployed)")
    parser.add_argument("--api-key", default="none", help="its Bearer key, if it needs one")
    parser.add_argument("--model", help="model id (default: the one the server lists)")
    parser.add_argument("--only", metavar="PARAMETER", help="run only this parameter's checks (e.g. response_format)")
    args = parser.parse_args()
    url, stop, checkpoint = args.url, None, None
    if url is None:
        from stages.cluster import ensure_ray
        from stages.serve import ServeConfig, deploy, newest_checkpoint, shutdown

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        checkpoint = args.checkpoint or str(newest_checkpoint())
        print(f"deploying {checkpoint} ...", flush=True)
        ensure_ray(min_cpus=1)
        t = time.perf_counter()
        url = deploy(ServeConfig(checkpoint=checkpoint, port=port, max_batch_size=4))
        print(f"deployed at {url} in {time.perf_counter() - t:.1f}s", flush=True)
        stop = shutdown
    try:
        conformance = Conformance(url, args.api_key, args.model)
        results = run_checks(conformance, only=args.only)
    finally:
        if stop is not None:
            stop()
    print("\n" + matrix(results) + "\n", flush=True)
    result = summary(results, url, checkpoint, conformance.schema_answers, conformance)
    print(json.dumps(result), flush=True)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

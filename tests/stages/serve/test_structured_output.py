"""Structured output without a server: the tokenizer adapter gives llguidance the bytes each
token adds to the text, and rows of the continuous-batching engine constrained by a JSON
schema produce valid JSON (greedy and sampled, several seeds) beside unconstrained rows that
compute exactly what they compute alone; tool-call grammars (`tool_choice` required or named)
give a header and arguments valid under the function's schema, one call or several."""

import json
import re
import sys
import threading

import jsonschema
import pytest
import torch

from glm.chat_format import ASSISTANT, ROLES, chat_format
from glm.config import padded_vocab_size, preset
from glm.generation import GenerationConfig, SpanQuery, Utf8Guard, generate_spans
from glm.model import GLMModel
from glm.tokenizer import GLMTokenizer
from stages.serve.engine import DecodeEngine, SpanRequest, wait_for
from stages.serve.structured import ANY_JSON_OBJECT, LLGUIDANCE, Grammars, tool_calls_lark, vocabulary

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},  # bounded digits
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                  "active": {"type": "boolean"}},
                  "required": ["id", "active"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "score", "tags", "owner"],
    "additionalProperties": False,
}
TEXTS = ['{"name": "Ünïcödé 话说", "n": [1, 2.5e-3, null, true]}', "  indented\n\tcode  ", "The quick brown fox"]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer)


def query(tokenizer, text: str) -> SpanQuery:
    ids = tokenizer.encode(text) + [tokenizer.special.gmask]
    return SpanQuery(ids, len(ids) - 1, True)


def test_token_bytes_add_up_to_the_text_and_special_tokens_are_marked(tokenizer):
    tokens, special = vocabulary(tokenizer)
    assert len(tokens) == len(tokenizer)
    for text in TEXTS:
        assert b"".join(tokens[i] for i in tokenizer.encode(text)) == text.encode("utf-8")
    s = tokenizer.special
    assert {s.mask, s.smask, s.gmask, s.sop, s.eop, s.pad, s.eos} <= set(special)
    assert all(tokens[i].startswith(b"\xff") for i in special)
    text_tokens = [i for i in range(len(tokens)) if i not in special and not tokenizer.sp.is_byte(i)]
    assert not any(tokens[i].startswith(b"\xff") for i in text_tokens)  # (0xFF is never in UTF-8 text)
    assert tokens[tokenizer.sp.piece_to_id("<0xE4>")] == b"\xe4"  # a byte-fallback piece is its byte
    assert tokens[tokenizer.sp.piece_to_id("\n")] == b"\n"  # a user-defined whitespace piece is text


def test_chatglm_whitespace_pieces_are_their_whitespace():
    from chatglm_reference import train_ice_text
    from conftest import sample_texts

    tokenizer = GLMTokenizer(train_ice_text(sample_texts()))
    assert tokenizer.convention == "chatglm"
    tokens, special = vocabulary(tokenizer)
    piece = tokenizer.sp.piece_to_id
    assert tokens[piece("<n>")] == b"\n" and tokens[piece("<|tab|>")] == b"\t"
    assert tokens[piece("<|blank_4|>")] == b"    "
    assert {piece("<sop>"), piece("<eop>"), piece("[MASK]"), piece("[gMASK]"), piece("</s>")} <= set(special)
    text = "def f():\n    return  1"
    # a dummy-prefix vocabulary writes a space before the text, which decoding drops
    assert b"".join(tokens[i] for i in tokenizer.encode(text)).removeprefix(b" ") == text.encode()
    Grammars(tokenizer).compile(SCHEMA)


def test_without_llguidance_the_error_says_what_to_install(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    with pytest.raises(RuntimeError, match=re.escape(f"pip install {LLGUIDANCE}")):
        Grammars(tokenizer)


def test_a_schema_the_library_cannot_compile_is_named(grammars):
    with pytest.raises(ValueError, match="strin"):
        grammars.compile({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(ValueError, match="look-around"):
        grammars.compile({"type": "string", "pattern": "(?<=x)a"})


def test_the_mask_allows_what_the_grammar_allows(tokenizer, grammars):
    matcher = grammars.matcher(grammars.compile(SCHEMA))
    tokens, _ = vocabulary(tokenizer)
    assert [tokens[i] for i in matcher.allowed().nonzero().flatten().tolist()] == [b"{"]
    logits = torch.zeros(1, padded_vocab_size(len(tokenizer)))
    logits[0, 5] = torch.finfo(torch.float32).min  # a ban, not on an allowed token
    matcher.mask(logits)
    assert torch.isfinite(logits).sum() == 1 and logits[0, tokenizer.encode("{")[0]] == 0
    for token in tokenizer.encode('{"name": "x", "kind": "fox", "age": 7, "score": 0.75, "tags": [], '
                                  '"owner": {"id": 3, "active": false}}'):
        assert not matcher.complete
        matcher.consume(token)
    assert matcher.complete
    assert sorted(matcher.allowed().nonzero().flatten().tolist()) == grammars.end_ids


def run_rows(engine, items):
    """Submit (query, config, matcher) rows at once; returns their final events in order."""
    results = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def worker(i, q, config, matcher):
        barrier.wait()
        results[i] = wait_for(engine, q, config, timeout=300, grammar=matcher)

    threads = [threading.Thread(target=worker, args=(i, *item)) for i, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_constrained_rows_give_valid_json_beside_unconstrained_rows(model, tokenizer, grammars):
    grammar = grammars.compile(SCHEMA)
    plain = GenerationConfig(max_new_tokens=16)
    configs = [GenerationConfig(max_new_tokens=256)] + [
        GenerationConfig(max_new_tokens=256, do_sample=True, temperature=t, top_p=p, seed=seed)
        for seed, (t, p) in enumerate([(1.0, 1.0), (0.7, 0.9), (1.3, 1.0), (1.0, 0.8)])]
    prompts = ["Describe a pet as JSON:", "话说天下大势", "The quick brown fox", "{", "Hello"]
    engine = DecodeEngine(model, tokenizer, max_batch_size=4)
    try:
        items = [(query(tokenizer, p), c, grammars.matcher(grammar)) for p, c in zip(prompts, configs)]
        items.insert(1, (query(tokenizer, "Hello"), plain, None))  # an unconstrained row in the batch
        events = run_rows(engine, items)
    finally:
        engine.close()
    unconstrained = events.pop(1)
    assert unconstrained.tokens == generate_spans(model, [query(tokenizer, "Hello")], tokenizer.special, plain,
                                                  len(tokenizer), Utf8Guard.of(tokenizer))[0]
    for event in events:
        assert event.finish_reason == "stop", event
        jsonschema.validate(json.loads(event.text), SCHEMA)
    assert len({e.text for e in events}) > 1  # sampling with other seeds gives other documents


def test_grammar_wins_over_bans_and_whitespace_cannot_run_away(model, tokenizer, grammars):
    schema = {"type": "object", "properties": {"a": {"const": "x"}, "b": {"const": "x"}}, "required": ["a", "b"],
              "additionalProperties": False}
    engine = DecodeEngine(model, tokenizer)
    try:
        # no_repeat_ngram_size 1 bans every token already used: the grammar needs '"' again
        event = wait_for(engine, query(tokenizer, "JSON:"), GenerationConfig(max_new_tokens=64, no_repeat_ngram_size=1),
                         timeout=120, grammar=grammars.matcher(grammars.compile(schema)))
        assert event.finish_reason == "stop" and json.loads(event.text) == {"a": "x", "b": "x"}
        # a +100 bias on whitespace: outside strings only json.dumps's separators are allowed
        bias = {tokenizer.encode(w)[0]: 100.0 for w in ("\n", "\t", "    ")}
        event = wait_for(engine, query(tokenizer, "JSON:"), GenerationConfig(max_new_tokens=256, logit_bias=bias),
                         timeout=120, grammar=grammars.matcher(grammars.compile(SCHEMA)))
    finally:
        engine.close()
    assert event.finish_reason == "stop", event
    jsonschema.validate(json.loads(event.text), SCHEMA)
    assert "\n" not in event.text and "\t" not in event.text, event.text  # (raw in JSON strings neither)
    # any JSON object: after '{' no token that is only whitespace is allowed
    tokens, _ = vocabulary(tokenizer)
    matcher = grammars.matcher(grammars.compile(ANY_JSON_OBJECT))
    matcher.consume(tokenizer.encode("{")[0])
    allowed = [tokens[i] for i in matcher.allowed().nonzero().flatten().tolist()]
    assert allowed and not any(t.strip() == b"" for t in allowed), allowed


def test_max_tokens_before_the_end_gives_length_and_a_prefix(model, tokenizer, grammars):
    engine = DecodeEngine(model, tokenizer)
    matcher = grammars.matcher(grammars.compile(SCHEMA))
    events = []
    done = threading.Event()

    def on_event(event):
        events.append(event)
        if event.done:
            done.set()

    try:
        engine.submit(SpanRequest(query(tokenizer, "JSON:"), GenerationConfig(max_new_tokens=5), on_event,
                                  grammar=matcher, logprobs=2))
        assert done.wait(120)
    finally:
        engine.close()
    final = events[-1]
    assert final.finish_reason == "length" and len(final.tokens) == 5 and final.text.startswith('{"')
    assert "".join(e.delta for e in events) == final.text  # streamed as generated
    assert not matcher.complete
    steps = [lp for e in events for lp in e.logprobs]
    assert [lp.token for lp in steps] == final.tokens
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in steps)
    assert steps[0].top[1][1] == -9999.0  # '{' is the only token the grammar allows first


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city"], "additionalProperties": False,
           "description": 'braces } {, quotes " and a\nnewline, 话说 (embedded in the grammar as JSON)'}
CALLS = {"get_weather\n": WEATHER, "get_time\n": None}
"""Tool calls as `ToolPlan.calls` has them: header text -> parameters schema (None: none)."""


def accepts(grammars, grammar: str, text: str, then: list[int] = ()) -> bool:
    """Whether the tokens of `text` (then the token ids `then`) are a prefix the grammar allows."""
    ids = grammars.lltokenizer.tokenize_str(text) + list(then)
    return grammars.matcher(grammar).matcher.validate_tokens(ids) == len(ids)


def test_a_tool_call_grammar_is_a_header_then_arguments_valid_under_its_schema(tokenizer, grammars):
    one = grammars.compile_tool_calls(CALLS, None)
    assert "%json" in tool_calls_lark(CALLS, None)
    tokens, _ = vocabulary(tokenizer)
    first = [tokens[i] for i in grammars.matcher(one).allowed().nonzero().flatten().tolist()]
    assert first and all(b"get_weather\n".startswith(t) or b"get_time\n".startswith(t) for t in first)
    for text in ('get_weather\n{"city": "Paris"}', 'get_weather\n{"city": "Paris", "days": 3}', "get_time\n{}"):
        matcher = grammars.matcher(one)
        for token in tokenizer.encode(text):
            assert not matcher.complete
            matcher.consume(token)
        assert matcher.complete, text  # one call: only an end token may follow
        assert sorted(matcher.allowed().nonzero().flatten().tolist()) == grammars.end_ids
    for text in ('get_weather\n{"town": "Paris"}', 'get_weather\n{"city": "Parisienne"}',  # maxLength 8
                 'get_weather\n{"city" : "Paris"}', 'get_weather\n{"city": "x", "days": 9', "get_time\n{\"a\"",
                 'get_news\n{}', '\nhello', 'get_weather {"city": "x"}'):
        assert not accepts(grammars, one, text), text
    named = grammars.compile_tool_calls({"get_time\n": None}, None)
    assert accepts(grammars, named, "get_time\n{}") and not accepts(grammars, named, "get_weather\n")


def test_parallel_calls_are_separated_by_the_assistant_token(tokenizer, grammars):
    several = grammars.compile_tool_calls(CALLS, ASSISTANT)
    separator = tokenizer.role_ids[ASSISTANT]
    matcher = grammars.matcher(several)
    for token in tokenizer.encode('get_weather\n{"city": "Rome"}'):
        matcher.consume(token)
    assert not matcher.complete  # another call may follow, or the end
    assert sorted(matcher.allowed().nonzero().flatten().tolist()) == sorted([*grammars.end_ids, separator])
    for token in [separator] + tokenizer.encode("get_time\n{}"):
        matcher.consume(token)
    assert set(grammars.end_ids) <= set(matcher.allowed().nonzero().flatten().tolist())
    assert not accepts(grammars, several, "get_time\n{}", [separator, separator])  # a call between separators
    one = grammars.compile_tool_calls(CALLS, None)
    assert not accepts(grammars, one, "get_time\n{}", [separator])


def test_a_parameters_schema_the_library_cannot_compile_names_the_function(grammars):
    with pytest.raises(ValueError, match="function 'broken'.*strin"):
        grammars.compile_tool_calls({"get_time\n": None, "broken\n": {"type": "strin"}}, None)


def test_tool_call_rows_in_a_batch_give_calls_that_validate(model, tokenizer, grammars):
    """Greedy and sampled rows (one call each) and a row whose bias on the separator makes it
    call again after every call, until max_tokens cuts the last one: every finished call
    validates, as the role format's reply parser reads the text."""
    roles = chat_format(ROLES, tokenizer)
    one, several = grammars.compile_tool_calls(CALLS, None), grammars.compile_tool_calls(CALLS, ASSISTANT)
    separator = tokenizer.role_ids[ASSISTANT]
    configs = [GenerationConfig(max_new_tokens=128)] + [
        GenerationConfig(max_new_tokens=128, do_sample=True, temperature=1.0, seed=seed) for seed in range(3)]
    items = [(query(tokenizer, "Weather in Paris?"), c, grammars.matcher(one)) for c in configs]
    items.append((query(tokenizer, "Weather?"), GenerationConfig(max_new_tokens=64, logit_bias={separator: 100.0}),
                  grammars.matcher(several)))
    engine = DecodeEngine(model, tokenizer, max_batch_size=4)
    try:
        events = run_rows(engine, items)
    finally:
        engine.close()
    schemas = {"get_weather": WEATHER, "get_time": {"type": "object", "additionalProperties": False}}
    *singles, parallel = events
    for event in singles:
        assert event.finish_reason == "stop", event
        [call] = roles.parse_reply(event.text, schemas).tool_calls
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert parallel.finish_reason == "length"
    calls = roles.parse_reply(parallel.text, schemas).tool_calls
    assert len(calls) >= 2
    for call in calls[:-1]:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])

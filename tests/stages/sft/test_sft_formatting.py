"""Conversations -> ChatGLM-formatted samples of the sample schema, and the prepared rows."""

import json

import numpy as np
import pytest

from glm.generation import build_chat_prompt
from glm.schema import IGNORE_INDEX
from stages.engine.data import ShardSource
from stages.sft.config import SFTDataConfig, SFTSource
from stages.sft.data import prepare
from stages.sft.formatting import BadRow, Conversation, conversation_samples, pack_rows, parse_row


def test_alpaca_conversations_and_messages_parse_to_rounds():
    alpaca = parse_row({"instruction": "Translate", "input": "你好", "output": "Hello",
                        "history": [["hi", "hey"]]})
    assert alpaca.rounds == [("hi", "hey"), ("Translate\n你好", "Hello")]
    share = parse_row({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                         {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]})
    assert share.rounds == [("a", "b"), ("c", "d")]
    messages = parse_row({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "r"}]})
    assert messages.rounds == [("Be brief.\nq", "r")]


@pytest.mark.parametrize("row, reason", [
    ({"text": "no shape"}, "unknown_shape"),
    ({"instruction": "q", "output": ""}, "empty_response"),
    ({"instruction": 3, "output": "x"}, "wrong_type"),
    ({"instruction": "q", "output": "a", "history": ["x"]}, "bad_history"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "bad_turn_order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
    ({"messages": []}, "empty_conversation"),
    ([1, 2], "not_an_object"),
])
def test_bad_rows_name_their_reason(row, reason):
    with pytest.raises(BadRow) as e:
        parse_row(row)
    assert e.value.reason == reason


def test_labels_cover_exactly_the_response_and_eop(tokenizer):
    special = tokenizer.special
    conv = Conversation.of_rounds([("What is GLM?", "A general language model.")])
    [s] = conversation_samples(conv, tokenizer, 128, use_2d=True)
    answer = tokenizer.encode("A general language model.")
    targeted = [i for i, t in enumerate(s.labels) if t != IGNORE_INDEX]
    assert [s.labels[i] for i in targeted] == answer + [special.eop]
    assert [s.input_ids[i] for i in targeted] == [special.sop] + answer  # inputs: [sop] + response, causal
    assert all(s.prefix_mask[i] == 0 for i in targeted)
    n_prompt = sum(s.prefix_mask)
    assert s.input_ids[:n_prompt] == tokenizer.encode("What is GLM?") + [special.gmask]  # the bare query
    assert all(label == IGNORE_INDEX for label in s.labels[:n_prompt])


def test_multi_round_history_renders_as_chatglm_and_each_turn_is_a_sample(tokenizer):
    conv = Conversation.of_rounds([("你好", "你好！"), ("你是谁？", "我是一个语言模型。")])
    samples = conversation_samples(conv, tokenizer, 256, use_2d=True)
    assert len(samples) == 2
    expected = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：你是谁？\n答："
    assert build_chat_prompt("你是谁？", [("你好", "你好！")]) == expected
    second = samples[1]
    prompt_ids = second.input_ids[:sum(second.prefix_mask) - 1]
    assert tokenizer.decode(prompt_ids) == expected
    assert conversation_samples(conv, tokenizer, 256, use_2d=True, last_turn_only=True)[0].input_ids == second.input_ids


def test_long_prompts_are_cut_from_the_left_and_the_response_kept_whole(tokenizer):
    history = [(f"question {i} " * 5, f"answer {i} " * 5) for i in range(20)]
    response = "the final answer stays whole"
    conv = Conversation.of_rounds(history + [("last question", response)])
    sample = conversation_samples(conv, tokenizer, 64, use_2d=True, last_turn_only=True)[0]
    answer = tokenizer.encode(response)
    assert len(sample) <= 64
    assert [t for t in sample.labels if t != IGNORE_INDEX] == answer + [tokenizer.special.eop]
    full_prompt = tokenizer.encode(build_chat_prompt("last question", history))
    kept = sample.input_ids[:sum(sample.prefix_mask) - 1]
    assert kept == full_prompt[-len(kept):]  # the newest end of the prompt survives
    with pytest.raises(BadRow, match="response_too_long"):
        conversation_samples(Conversation.of_rounds([("q", "word " * 200)]), tokenizer, 64, use_2d=True)


def test_packing_puts_several_samples_in_one_row(tokenizer):
    samples = [s for i in range(6) for s in conversation_samples(
        Conversation.of_rounds([(f"q{i}", f"answer number {i}")]), tokenizer, 64, use_2d=True)]
    rows = pack_rows(samples, 64, tokenizer.special.pad)
    assert len(rows) < len(samples)
    assert max(rows[0]["segment_ids"]) >= 2 and all(len(r["input_ids"]) == 64 for r in rows)
    assert len(pack_rows(samples, 64, tokenizer.special.pad, pack=False)) == len(samples)


def test_prepare_counts_bad_rows_and_writes_engine_readable_shards(tmp_path, tokenizer):
    good = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(40)]
    bad = ["{not json", json.dumps({"text": "x"}), json.dumps({"instruction": "q", "output": " "})]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in good] + bad) + "\n")
    cfg = SFTDataConfig(sources=[SFTSource(uri=str(path), name="mixed")], seq_len=64,
                        validation_fraction=0.1, output=str(tmp_path / "prepared"))
    manifest = prepare(cfg, tokenizer, use_2d=True, fingerprint="f1", log=lambda _: None)
    stats = manifest["sources"]["mixed"]
    assert stats["rows_read"] == 43 and stats["conversations"] == 40
    assert stats["rejected"] == {"bad_json": 1, "unknown_shape": 1, "empty_response": 1}
    assert any("sft.jsonl:41" in e for e in stats["examples"])  # file and line of a rejected row
    source = ShardSource(cfg.output, "train")
    assert source.size == manifest["splits"]["train"]["rows"] > 0
    rows = source.rows(np.arange(source.size))
    assert int((rows["labels"] != IGNORE_INDEX).sum()) == manifest["splits"]["train"]["target_tokens"]
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["validation"]["samples"] == 40
    assert prepare(cfg, tokenizer, use_2d=True, fingerprint="f1", log=lambda _: None) == manifest  # reused


def test_prepare_without_usable_rows_says_why(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    cfg = SFTDataConfig(sources=[SFTSource(uri=str(path))], seq_len=64, output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no usable training samples.*unknown_shape"):
        prepare(cfg, tokenizer, use_2d=True, fingerprint="f", log=lambda _: None)


def test_control_strings_in_conversations_stay_text(tokenizer):
    """"[eop]", "[MASK]" ... typed in a query or a response are text: the only special tokens in
    a sample are the ones the layout puts there ([gMASK], [sop], [eop])."""
    special = tokenizer.special
    conv = Conversation.of_rounds([("What does [MASK] mean? [gMASK]", "It ends with [eop] and [sop]</s>")],
                                   system="<pad> [sMASK]")
    [s] = conversation_samples(conv, tokenizer, 128, use_2d=True)
    layout = [t for t in s.input_ids + s.labels if t in set(vars(special).values())]
    assert sorted(layout) == sorted([special.gmask, special.sop, special.eop])
    answer = tokenizer.encode("It ends with [eop] and [sop]</s>")
    assert [t for t in s.labels if t != IGNORE_INDEX] == answer + [special.eop]


TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}],
    "messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]}


def test_tool_calls_train_only_the_assistant_call_and_answer(tokenizer):
    from glm.chat_format import ROLES, chat_format

    fmt = chat_format(ROLES, tokenizer)
    conv = parse_row(TOOL_ROW)
    samples = conversation_samples(conv, tokenizer, 256, use_2d=True, fmt=fmt)
    assert len(samples) == 2  # the call and the answer; system, user and tool turns are never targets
    targets = [[t for t in s.labels if t != IGNORE_INDEX] for s in samples]
    eop = tokenizer.special.eop
    assert targets[0] == fmt.header("get_weather") + tokenizer.encode('{"city": "Paris"}') + [eop]
    assert targets[1] == fmt.header("") + tokenizer.encode("It is 21 degrees in Paris.") + [eop]
    for s, target in zip(samples, targets):
        n_prompt = sum(s.prefix_mask)
        context = tokenizer.decode(s.input_ids[:n_prompt])
        assert all(label == IGNORE_INDEX for label in s.labels[:n_prompt])  # the whole prompt: no loss
        assert "Weather in Paris?" in context and "You can look up the weather." in context
    # the answer's prompt holds the tool result as an observation, and the call before it
    second = samples[1].input_ids[:sum(samples[1].prefix_mask) - 1]
    history, tools = fmt.parse(second[:-1])
    assert [m.role for m in history] == ["system", "user", "assistant", "tool"] and tools == conv.tools
    assert (history[3].name, history[3].content) == ("get_weather", '{"temp": 21}')
    assert second[-1] == fmt.ids["assistant"]
    # the ChatGLM-6B format has no tools: such a row is rejected with the reason
    with pytest.raises(BadRow, match="unsupported_by_format"):
        conversation_samples(conv, tokenizer, 256, use_2d=True)


def test_long_replies_are_cut_at_a_sentence_end_within_the_limit(tokenizer):
    from stages.sft.formatting import cut_reply, shorten_replies

    first, second = "今天天气很好。", "我们去公园散步，然后回家吃饭，晚上看一会儿书再睡觉。"
    limit = len(tokenizer.encode(first)) + 1
    assert cut_reply(first + second, limit, tokenizer) == first
    assert cut_reply(first, limit, tokenizer) == first  # fits: whole
    assert cut_reply("Yes. " + "and more " * 20, 4, tokenizer) == "Yes."
    assert cut_reply("no sentence end at all " * 5, 4, tokenizer) is None
    conv = Conversation.of_rounds([("q1", first + second), ("q2", "OK.")])
    assert shorten_replies(conv, limit, tokenizer).rounds == [("q1", first), ("q2", "OK.")]
    with pytest.raises(BadRow) as e:
        shorten_replies(Conversation.of_rounds([("q", "word " * 40)]), 4, tokenizer)
    assert e.value.reason == "reply_too_long"


def test_prepare_cuts_replies_and_keeps_heldout_prompts(tmp_path, tokenizer):
    rows = [{"instruction": f"question {i}", "output": f"Answer {i}. " + "More words here. " * 30} for i in range(40)]
    rows.append({"instruction": "q", "output": "x " * 80})  # no sentence end within the limit
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = SFTDataConfig(sources=[SFTSource(uri=str(path), name="long")], seq_len=128, reply_max_tokens=16,
                        validation_fraction=0.3, output=str(tmp_path / "prepared"))
    manifest = prepare(cfg, tokenizer, use_2d=True, fingerprint="f", log=lambda _: None)
    assert manifest["sources"]["long"]["rejected"] == {"reply_too_long": 1}
    source = ShardSource(cfg.output, "train")
    rows = source.rows(np.arange(source.size))
    for labels, seg in zip(rows["labels"], rows["segment_ids"]):
        for s in set(seg.tolist()) - {0}:  # each sample's targets: the cut reply + [eop]
            assert 0 < int(((labels != IGNORE_INDEX) & (seg == s)).sum()) <= 17
    held = manifest["heldout_prompts"]
    assert held and all(p["query"].startswith("question ") and p["history"] == [] for p in held)

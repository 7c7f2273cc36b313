"""Synthetic preference pairs from SFT chats: each family's rejected side has its property, the
pairs depend on content and config only, replies cut to fit end at a sentence end, and the
prepared data tags every held-out row with its family."""

import json
import re
import shutil

import pytest

from conftest import SAMPLE
from glm.chat_format import CHATGLM_6B, Message, chat_format
from stages.rlhf.config import PreferenceDataConfig, PreferenceSource, SyntheticPairsConfig
from stages.rlhf.data import fit_reply, parse_prompt, prepare
from stages.rlhf.families import cut_short, language, looped, parse_chat, rng_of, synthetic_pairs
from stages.sft.config import SFTSource
from stages.sft.formatting import BadRow

CHATS = [SAMPLE / "sft/zh_oasst1.jsonl", SAMPLE / "sft/en_dpo_demo_messages.jsonl"]


def chats(n: int = 30) -> list[tuple[str, str, object]]:
    out = []
    for path in CHATS:
        for line in path.read_text(encoding="utf-8").splitlines()[:n]:
            out.append(("train", line, parse_chat(json.loads(line))))
    return out


def longest_loop(text: str) -> int:
    """Most consecutive repeats of one substring of 2+ characters."""
    return max((len(m.group(0)) // len(m.group(1)) for m in re.finditer(r"(.{2,}?)\1+", text, re.S)), default=1)


def test_each_family_spoils_the_reply_its_way():
    cfg = SyntheticPairsConfig(pairs_per_chat=3, truncated_chars=8, min_repeats=4)
    seen = set()
    for _, family, chat, rejected in synthetic_pairs(chats(), cfg, seed=0):
        if not rejected:
            continue
        seen.add(family)
        assert rejected != chat.reply
        if family == "language":
            assert language(rejected) != language(chat.reply)
        elif family == "repetition":
            assert longest_loop(rejected) >= 4 and longest_loop(rejected) > longest_loop(chat.reply)
            assert len(rejected) >= 0.8 * len(chat.reply)
        else:
            assert chat.reply.startswith(rejected) and 1 <= len(rejected) <= 8 and len(chat.reply) >= 32
    assert seen == {"language", "repetition", "truncated"}


def test_family_helpers_on_known_text():
    rng = rng_of(0, "x")
    reply = "The cat sat on the mat. It was warm and it purred all afternoon long."
    spoiled = looped(reply, rng, 5)
    assert longest_loop(spoiled) >= 5 and spoiled.split()[0] == "The" and len(spoiled) >= len(reply)
    assert cut_short("短回复", rng, 8) == ""  # under 4 x 8 characters: no truncated pair
    assert language("你好，世界 hello") == "zh" and language("Hello, 世界 wide world") == "en"
    with pytest.raises(BadRow) as e:
        parse_chat({"messages": [{"role": "user", "content": "weather?"},
                                 {"role": "assistant", "content": None,
                                  "tool_calls": [{"id": "1", "type": "function",
                                                  "function": {"name": "w", "arguments": "{}"}}]},
                                 {"role": "tool", "tool_call_id": "1", "content": "sunny"},
                                 {"role": "assistant", "content": "Sunny."}]})
    assert e.value.reason == "tool_calls"


def test_pairs_depend_on_content_and_config_only():
    cfg = SyntheticPairsConfig(pairs_per_chat=2)

    def pairs(items, seed=0):
        return sorted((line, f, r) for (_, line, _), (_, f, _, r) in
                      zip([c for c in items for _ in range(2)], synthetic_pairs(items, cfg, seed)))

    first = pairs(chats())
    assert first == pairs(chats()[::-1])  # any file order: each chat keeps its pairs
    assert first != pairs(chats(), seed=1)


def test_a_cut_reply_ends_at_a_sentence_end_well_above_the_truncated_length(tokenizer):
    fmt = chat_format(CHATGLM_6B, tokenizer)
    text = "第一句话很短。" + "这是第二句话，它比较长，也有逗号。" * 6 + "最后一句没有结尾"
    ids, cut = fit_reply(text, fmt, room=80, min_chars=32)
    decoded = tokenizer.decode(ids)
    assert cut and len(ids) <= 80 and decoded.endswith("。") and len(decoded) >= 32 and text.startswith(decoded)
    assert len(fmt.reply(Message("assistant", text[:len(decoded) + 17]))) > 80  # the next sentence does not fit
    assert fit_reply("短。", fmt, room=30) == (tokenizer.encode("短。"), False)
    ids, cut = fit_reply("没有标点的很长的一句话" * 20, fmt, room=12)
    assert cut and len(ids) == 12  # no sentence or clause end: cut after room tokens


def test_prompt_rows_of_every_shape():
    assert parse_prompt({"query": "q2", "history": [["q1", "a1"]]}).messages()[-1].content == "q2"
    p = parse_prompt({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}]})
    assert (p.query, p.system, p.history) == ("hi", "Be brief.", [])
    assert parse_prompt({"prompt": "\n\nHuman: hi\n\nAssistant:"}).query == "hi"
    assert parse_prompt({"instruction": "translate", "input": "猫"}).query == "translate\n猫"
    with pytest.raises(BadRow):
        parse_prompt({"text": "no prompt"})


def test_prepare_tags_rows_by_family_independently_of_paths(tokenizer, tmp_path):
    copies = []
    for path in CHATS:  # the same chats at another path give the same rows
        copies.append(tmp_path / "elsewhere" / path.name)
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(path, copies[-1])

    def cfg(paths, out):
        return PreferenceDataConfig(
            sources=[PreferenceSource(uri=str(SAMPLE / "preference/zh_oasst1_pairs.jsonl"), name="zh_pairs")],
            synthetic=SyntheticPairsConfig(sources=[SFTSource(uri=str(p)) for p in paths], pairs_per_chat=2),
            max_len=64, max_samples=40, validation_fraction=0.3, output=str(tmp_path / out))

    manifest = prepare(cfg(CHATS, "a"), tokenizer, layout="pairs", use_2d=True, fingerprint="f", log=lambda *_: None)
    made = manifest["synthetic"]["families"]
    assert sum(m["pairs"] + m["skipped"] for m in made.values()) == 2 * 80
    families = manifest["validation_families"]
    assert len(families) == manifest["splits"]["validation"]["rows"]
    assert set(families) == {"zh_pairs", "language", "repetition", "truncated"}
    assert sum(manifest["family_rows"]["train"].values()) == manifest["splits"]["train"]["rows"]
    again = prepare(cfg(copies, "b"), tokenizer, layout="pairs", use_2d=True, fingerprint="f", log=lambda *_: None)
    assert again["validation_families"] == families
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in manifest["splits"]["train"]["shards"]]

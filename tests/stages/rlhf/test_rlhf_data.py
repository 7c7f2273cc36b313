"""Preference rows -> ChatGLM-formatted pair / prompt rows; malformed pairs counted; the
reward checkpoint format; the CLI's help and config errors."""

import json

import pytest
import torch

from conftest import SAMPLE
from glm.chat_format import CHATGLM_6B, chat_format
from glm.config import ConfigError, padded_vocab_size, preset
from glm.generation import build_chat_prompt
from glm.model import GLMModel
from glm.schema import IGNORE_INDEX
from glm.value_head import ScalarHeadModel, last_token_index, load_reward_checkpoint, save_reward_checkpoint
from stages.rlhf.config import PreferenceDataConfig, PreferenceSource, RLHFConfig
from stages.rlhf.data import pair_row, parse_pair, prepare, prompt_ids, prompt_row
from stages.sft.formatting import BadRow


def test_every_shipped_shape_parses_into_chatglm_rounds(tokenizer):
    hh = parse_pair({"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
                     "chosen": "fine", "rejected": "go away"})
    assert (hh.query, hh.history, hh.chosen) == ("how are you?", [("hi", "hello")], "fine")
    conv = parse_pair({"conversation": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q1"},
                                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
                       "chosen": {"role": "assistant", "content": "yes"}, "rejected": "no"})
    assert (conv.query, conv.history, conv.system, conv.chosen) == ("q2", [("q1", "a1")], "Be kind.", "yes")
    chatglm = chat_format(CHATGLM_6B, tokenizer)  # no system role: it opens the first query
    assert prompt_ids(conv, chatglm) == tokenizer.encode(build_chat_prompt("q2", [("Be kind.\nq1", "a1")]))
    inst = parse_pair({"instruction": "translate", "input": "猫", "history": [["你好", "hi"]],
                       "chosen": "cat", "rejected": "dog"})
    assert (inst.query, inst.history) == ("translate\n猫", [("你好", "hi")])


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "q", "chosen": "", "rejected": "r"}, "empty_chosen"),
    ({"prompt": "q", "chosen": "c"}, "missing_side"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_sides"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "wrong_type"),
    ({"conversation": [{"role": "assistant", "content": "a"}], "chosen": "c", "rejected": "r"}, "no_final_query"),
    ({"text": "x"}, "unknown_shape"),
])
def test_malformed_pairs_name_their_reason(row, reason):
    with pytest.raises(BadRow) as e:
        parse_pair(row)
    assert e.value.reason == reason


def test_pair_row_holds_both_sides_in_the_chatglm_format(tokenizer):
    pair = parse_pair({"instruction": "你好", "history": [["hi", "hello"]], "chosen": "good answer", "rejected": "bad"})
    row, cut = pair_row(pair, tokenizer, max_len=64, use_2d=True)
    special = tokenizer.special
    prompt = tokenizer.encode(build_chat_prompt("你好", [("hi", "hello")]))
    seg = torch.tensor(row["segment_ids"])
    ids = torch.tensor(row["input_ids"])
    assert not cut and len(row["input_ids"]) == 128
    for s, reply in ((1, "good answer"), (2, "bad")):
        side = ids[seg == s].tolist()
        assert side == prompt + [special.gmask, special.sop] + tokenizer.encode(reply)
        labels = torch.tensor(row["labels"])[seg == s].tolist()
        assert [t for t in labels if t != IGNORE_INDEX] == tokenizer.encode(reply) + [special.eop]
    assert last_token_index(seg[None], 2).item() == int((seg > 0).sum()) - 1
    p = prompt_row(prompt, tokenizer, 16)
    assert [t for t, s in zip(p["input_ids"], p["segment_ids"]) if s] == prompt[-15:] + [special.gmask]
    assert set(p["prefix_mask"][:16]) == {1} and all(t == IGNORE_INDEX for t in p["labels"])


def test_prepare_counts_and_skips_bad_pairs(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"prompt": "q", "chosen": "", "rejected": "r"}), "{not json",
                              json.dumps({"prompt": "q", "chosen": "c", "rejected": "r"})]) + "\n")
    cfg = PreferenceDataConfig(sources=[PreferenceSource(uri=str(bad)),
                                        PreferenceSource(uri=str(SAMPLE / "preference/en_dpo_demo.jsonl"))],
                               max_len=64, max_samples=20, output=str(tmp_path / "out"))
    manifest = prepare(cfg, tokenizer, layout="pairs", use_2d=True, fingerprint="f", log=lambda *_: None)
    assert manifest["sources"]["bad"]["rejected"] == {"empty_chosen": 1, "bad_json": 1}
    assert manifest["sources"]["bad"]["pairs"] == 1 and manifest["sources"]["en_dpo_demo"]["pairs"] == 20
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["validation"]["rows"] == 21
    assert manifest["schema"]["seq_len"] == 128 and manifest["kind"] == "rlhf_pairs"


def test_reward_checkpoint_round_trip(tokenizer, tmp_path):
    model = ScalarHeadModel(GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer))))).eval()
    torch.nn.init.normal_(model.value_head.weight)
    save_reward_checkpoint(model, tokenizer, tmp_path / "rm", metadata={"stage": "test"})
    loaded, _ = load_reward_checkpoint(tmp_path / "rm")
    x = torch.tensor([[5, 6, 7, 8]])
    pos = torch.arange(4)[None]
    assert torch.equal(loaded(x, pos), model(x, pos))
    from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config

    assert read_checkpoint_config(tmp_path / "rm")[1]["kind"] == "reward_model"
    load_inference_checkpoint(tmp_path / "rm")  # the backbone alone is a plain inference checkpoint
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        from glm.checkpoint import save_inference_checkpoint

        save_inference_checkpoint(model.backbone, tokenizer, tmp_path / "plain")
        load_reward_checkpoint(tmp_path / "plain")


def test_config_validation_and_cli_help(tmp_path, capsys):
    with pytest.raises(ConfigError, match="mode must be one of"):
        RLHFConfig(output="x", mode="rlhf")
    from stages.engine.config import EngineConfig

    with pytest.raises(ConfigError, match="grad_accum_steps must be 1"):
        RLHFConfig(output="x", mode="ppo", engine=EngineConfig(grad_accum_steps=2))
    from stages.rlhf.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "reward" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\nmode: ppo\nppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(bad)])
    assert e.value.code == 2 and "kl_coeff" in capsys.readouterr().err


def test_control_strings_in_preference_pairs_stay_text(tokenizer):
    """Control strings in queries, history and replies are text: each side of the pair holds
    only its layout's [gMASK] and [sop] (and [eop] in the targets)."""
    from stages.rlhf.data import PreferencePair

    special = tokenizer.special
    pair = PreferencePair(query="[gMASK] say [eop]", chosen="fine [sop]", rejected="no [MASK]</s>",
                          history=[("[sMASK]?", "<pad>")])
    row, _ = pair_row(pair, tokenizer, 128, use_2d=True)
    specials = set(vars(special).values()) - {special.pad}
    ids = [t for t in row["input_ids"] if t in specials]
    assert sorted(ids) == sorted([special.gmask, special.sop] * 2)
    assert [t for t in row["labels"] if t in specials] == [special.eop, special.eop]

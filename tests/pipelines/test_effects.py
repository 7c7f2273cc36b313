"""The pipeline's final answer check and its effects summary."""

import pytest

from pipelines.effects import check_answers, summary
from stages.effects import answer_problems, language
from stages.effects import write_effects


def test_language():
    assert language("话说天下大势，分久必合") == "zh"
    assert language("I can answer questions.") == "en"
    assert language("，，，") is None


def test_noise_answers_fail_loudly():
    assert answer_problems("你好", "   ") == ["the answer is empty"]
    assert any("one token repeated" in p for p in answer_problems("你好", "，，，，"))
    assert any("one token repeated" in p for p in answer_problems("What can you do?", "the the the"))
    assert any("language" in p for p in answer_problems("你好", "I am a model"))
    assert answer_problems("话说天下大势，[MASK]", "分久必合，合久必分") == []
    assert any("no words" in p for p in answer_problems("你好", "，。！"))
    assert any("mostly punctuation" in p for p in answer_problems("你好", "，，，。，，的，，"))
    assert any("broken characters" in p for p in answer_problems("你好", "\ufffd所"))
    assert answer_problems("你好", "你好，我是助手\ufffd") == []  # the last character cut by the token limit
    assert any("a loop" in p for p in answer_problems("What can you do?", "I can do it, do it, do it, do it"))
    for prompt, short in (("What is the capital of France?", "Paris"), ("话说天下大势，[MASK]", "分"),
                          ("How many legs has a spider?", "8"), ("What is the capital of France?", "Paris.")):
        assert answer_problems(prompt, short) == [], short  # a one-word answer is an answer, not noise
    with pytest.raises(RuntimeError, match="final check failed"):
        check_answers({"chat: 你好": "，，，", "fill: 话说天下大势，[MASK]": "分久必合"})
    check_answers({"chat: 你好": "你好，我是人工智能助手。", "fill: 话说天下大势，[MASK]": "分久必合"})


def test_summary_reads_each_stage_effects(tmp_path, capsys):
    model = str(tmp_path / "pretrain" / "model")
    write_effects(model, {"stage": "pretrain", "val_ppl": 100.0, "val_tokens": 5, "baseline_unigram_ppl": 400.0,
                          "baseline_bigram_ppl": 120.0, "val_ppl_over_unigram": 0.25, "val_ppl_over_bigram": 0.83})
    found = summary({"pretrain": {"model": model}, "sft": {"model": str(tmp_path / "sft" / "model")}})
    assert list(found) == ["pretrain"]
    assert "0.250x" in capsys.readouterr().out


def test_summary_lines_of_sft_and_the_reward_model(tmp_path, capsys):
    sft, reward = str(tmp_path / "sft" / "model"), str(tmp_path / "rlhf" / "reward")
    write_effects(sft, {"stage": "sft", "val_loss_before": 6.0, "val_loss_after": 4.5, "chat_prompts": 20,
                        "chat_max_new_tokens": 64, "chat_language_rate": 0.9, "chat_ended_rate": 0.85,
                        "chat_sensible_rate": 0.8, "chat_good_rate": 0.75})
    write_effects(reward, {"stage": "reward", "val_accuracy_before": 0.5, "val_accuracy_after": 0.95,
                           "heldout_accuracy.language": 1.0, "heldout_pairs.language": 12,
                           "heldout_accuracy.truncated": 0.9, "heldout_pairs.truncated": 10})
    summary({"sft": {"model": sft}, "rlhf": {"reward_model": reward}})
    out = capsys.readouterr().out
    assert "6 -> 4.5 (-25.0%)" in out and "90% in the prompt's language, 85% ended within 64 tokens" in out
    assert "by family: language 1.000 (12 pairs), truncated 0.900 (10 pairs)" in out

"""`python -m stages.rlhf.score`: pair accuracy per family and the reward of a policy's replies,
on tiny checkpoints; the last stdout line is the JSON result."""

import json

import pytest
import torch

from conftest import SAMPLE
from glm.checkpoint import save_inference_checkpoint
from glm.config import padded_vocab_size, preset
from glm.model import GLMModel
from glm.value_head import ScalarHeadModel, save_reward_checkpoint
from stages.rlhf.data import pair_row, parse_pair
from stages.rlhf.score import accuracy_report, main, rewards_of_rows
from stages.rlhf.steps import reward_step


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("score")
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))
    reward = ScalarHeadModel(GLMModel(config)).eval()
    torch.nn.init.normal_(reward.value_head.weight)
    save_reward_checkpoint(reward, tokenizer, tmp / "rm", metadata={"pairs": {"max_len": 40, "min_chars": 8}})
    save_inference_checkpoint(GLMModel(config), tokenizer, tmp / "policy", metadata={"chat_format": "roles"})
    return tmp, reward


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_pairs_accuracy_per_family_matches_the_training_step(checkpoints, tokenizer, tmp_path, capsys):
    tmp, reward = checkpoints
    rows = [json.loads(line) for line in (SAMPLE / "preference/en_dpo_demo.jsonl").read_text().splitlines()[:6]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({**r, **({"family": "odd"} if i % 2 else {})}) for i, r in enumerate(rows))
                     + "\n{not json\n")
    assert main(["pairs", "--reward-model", str(tmp / "rm"), "--pairs", str(pairs), "--batch-size", "4"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["pairs"] == 6 and result["family_pairs"] == {"odd": 3, "real": 3}
    assert result["rejected"] == {"bad_json": 1} and set(result["by_family"]) == {"odd", "real"}
    # the same rows the reward stage trains on (its recorded max_len), the same rewards as its step
    batch = [pair_row(parse_pair(r), tokenizer, 40, True, min_chars=8)[0] for r in rows]
    batch = {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}
    assert result["accuracy"] == pytest.approx(float(reward_step(reward, batch)["accuracy"]))
    chosen, rejected = rewards_of_rows(reward, {k: v.numpy() for k, v in batch.items()}, (1, 2), batch_size=4)
    assert accuracy_report(chosen, rejected, ["a"] * 6)["accuracy"] == pytest.approx(result["accuracy"])


def test_responses_are_generated_and_scored(checkpoints, tmp_path, capsys):
    tmp, _ = checkpoints
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"query": "你好"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"prompt": "\n\nHuman: what is 2+2?\n\nAssistant:"}, {"nothing": 1}]) + "\n")
    argv = ["responses", "--reward-model", str(tmp / "rm"), "--policy", str(tmp / "policy"), "--prompts", str(prompts),
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    greedy = last_json(capsys.readouterr().out)
    assert (greedy["prompts"], greedy["responses"]) == (3, 3) and greedy["std_reward"] >= 0
    assert main(argv + ["--samples", "2", "--seed", "5"]) == 0
    sampled = last_json(capsys.readouterr().out)
    assert (sampled["prompts"], sampled["responses"]) == (3, 6)
    assert main(argv + ["--samples", "2", "--seed", "5"]) == 0
    assert last_json(capsys.readouterr().out) == sampled  # seeded


def test_help_and_missing_inputs(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "responses" in capsys.readouterr().out
    tmp, _ = checkpoints
    assert main(["pairs", "--reward-model", str(tmp / "rm"), "--pairs", str(tmp_path / "none.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err

"""Pipeline config loading and stage wiring, without running anything."""

import pytest

from conftest import REPO
from glm.config import ConfigError
from pipelines.full import PipelineConfig, eval_config, load_config, selected_stages, stage_config

SMOKE = REPO / "pipelines/configs/smoke.yaml"


def wired(p: PipelineConfig) -> dict:
    outputs, configs = {}, {}
    from pipelines.full import STAGES

    for name in p.stages:
        configs[name] = stage_config(p, name, outputs)
        if not STAGES[name].deploys:
            outputs[name] = STAGES[name].outputs(configs[name])
    return configs


def test_each_stage_takes_the_previous_outputs_and_the_pipeline_defaults():
    p = load_config(str(SMOKE), run_name="exp1")
    assert p.name == "exp1" and p.work_dir == "runs/exp1"
    c = wired(p)
    assert c["pretrain"].data == c["data"].output == "runs/exp1/data"
    assert c["sft"].base == c["pretrain"].output == "runs/exp1/pretrain/model"
    assert c["rlhf"].reward.base == c["rlhf"].policy.base == c["sft"].output
    assert c["rlhf"].policy.reward_model == c["rlhf"].reward.output  # PPO scores with the reward model just trained
    assert c["quantize"].checkpoint == c["rlhf"].policy.output  # the last trained model
    assert c["serve"].checkpoint == c["quantize"].output
    assert (c["pretrain"].engine.run_name, c["sft"].engine.run_name, c["rlhf"].policy.engine.run_name) == \
        ("exp1-pretrain", "exp1-sft", "exp1-ppo")
    assert c["sft"].engine.storage_path == "runs/exp1/ray" and c["sft"].tracking.enabled
    e = eval_config(p, "quantize", c["quantize"].output)
    assert e.checkpoint == c["quantize"].output and e.run_name == "eval-quantize"
    assert e.output == "runs/exp1/eval/quantize.json"


def test_stage_selection_and_order_are_checked():
    p = load_config(str(SMOKE))
    assert selected_stages(p, "sft", None) == ["sft"]
    assert selected_stages(p, None, "quantize") == ["quantize", "serve"]
    with pytest.raises(ConfigError, match="must be in pipeline order"):
        PipelineConfig(stages=["sft", "data"])
    with pytest.raises(ConfigError, match="not available"):
        PipelineConfig(stages=["data", "distill"])
    with pytest.raises(ConfigError, match="eval_after.*serve"):
        PipelineConfig(eval_after=["serve"])


def test_a_stage_without_its_input_says_which_stage_to_run():
    p = PipelineConfig(stages=["sft"], sft={"data": {"sources": [{"uri": "x.jsonl"}]}})
    with pytest.raises(RuntimeError, match="sft needs the output of the pretrain stage"):
        stage_config(p, "sft", {})


def test_a_stage_hash_covers_its_config_and_everything_upstream():
    from pipelines.full import fingerprint

    p = load_config(str(SMOKE))
    c = wired(p)
    pretrain = fingerprint(c["pretrain"], fingerprint(c["data"]))
    assert fingerprint(c["sft"], pretrain) != fingerprint(c["sft"], fingerprint(c["pretrain"], "another data hash"))
    c["sft"].tracking.experiment = "elsewhere"
    assert fingerprint(c["sft"], pretrain) == fingerprint(wired(p)["sft"], pretrain)  # where it logs is not what it makes

"""Pipeline config loading and stage wiring, without running anything."""

import re

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
        ("exp1-pretrain", "exp1-sft", "exp1-grpo")
    assert c["sft"].engine.storage_path == "runs/exp1/ray" and c["sft"].tracking.enabled
    e = eval_config(p, "quantize", c["quantize"].output)
    assert e.checkpoint == c["quantize"].output and e.run_name == "eval-quantize"
    assert e.output == "runs/exp1/eval/quantize-{time}.json"  # each run its own report


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


def test_engine_runs_are_named_by_their_config_hash():
    from pipelines.full import fingerprint
    from pipelines.runs import key_runs

    p = load_config(str(SMOKE), run_name="exp1")
    c = wired(p)
    [run] = key_runs("pretrain", c["pretrain"], "up")
    assert run.engine.run_name == f"exp1-pretrain-{fingerprint(c['pretrain'], 'up')[:8]}"
    assert run.config_hash == fingerprint(c["pretrain"], "up")  # the stage's own hash in the chain
    changed = wired(p)["pretrain"]
    changed.engine.optim.lr *= 2
    assert key_runs("pretrain", changed, "up")[0].engine.run_name != run.engine.run_name
    injected = wired(p)["pretrain"]  # fault injection and restarts: how a run gets there, not what it makes
    injected.engine.fail_at_steps, injected.engine.max_failures = [3], 0
    assert key_runs("pretrain", injected, "up")[0].engine.run_name == run.engine.run_name
    reward, policy = key_runs("rlhf", c["rlhf"], "up")
    assert (reward.label, policy.label) == ("reward", "grpo") and reward.engine.run_name.startswith("exp1-reward-")
    changed = wired(p)["rlhf"]
    changed.policy.engine.optim.lr *= 2  # a changed policy retrains the policy, not the reward model
    reward2, policy2 = key_runs("rlhf", changed, "up")
    assert reward2.engine.run_name == reward.engine.run_name and policy2.engine.run_name != policy.engine.run_name


def test_resume_from_run_is_explicit_and_changes_the_identity():
    from pipelines.full import fingerprint
    from pipelines.runs import apply_resume_from

    p = load_config(str(SMOKE), run_name="exp1")
    before = wired(p)["pretrain"]
    assert before.engine.resume_from == ""  # never the default
    apply_resume_from(p, ["pretrain=exp1-pretrain-0123abcd", "grpo=s3://bucket/runs/old/ray/x-ppo-1"])
    c = wired(p)
    assert c["pretrain"].engine.resume_from.endswith("/runs/exp1/ray/exp1-pretrain-0123abcd")  # made absolute
    assert c["rlhf"].policy.engine.resume_from == "s3://bucket/runs/old/ray/x-ppo-1"
    assert fingerprint(c["pretrain"]) != fingerprint(before)  # a run continued from another is another run
    for bad, message in (("pretrain", "expected RUN=NAME"), ("dpo=x", "not an engine run"), ("eval=x", "not an engine run")):
        with pytest.raises(ConfigError, match=message):
            apply_resume_from(load_config(str(SMOKE)), [bad])


def stage_hashes(p: PipelineConfig) -> dict[str, str]:
    """Every stage's and evaluation's config hash, chained as the driver chains them."""
    from pipelines.full import STAGES, fingerprint

    hashes, upstream, outputs = {}, "", {}
    for name, cfg in wired(p).items():
        if STAGES[name].deploys:
            continue
        hashes[name] = upstream = fingerprint(cfg, upstream)
        outputs[name] = STAGES[name].outputs(cfg)
        if name in p.eval_after:
            hashes[f"eval-{name}"] = fingerprint(eval_config(p, name, outputs[name]["model"]), upstream)
    return hashes


def test_set_overrides_change_the_run_identity_exactly_as_an_edited_yaml(tmp_path):
    text = SMOKE.read_text()
    edited = tmp_path / "edited.yaml"
    pretrain_lr = re.compile(r"(optim: \{lr: )[0-9.e-]+")  # the first optim section is pretraining's
    edited.write_text(re.sub(r"eval_after: \[[^\]]*\]", "eval_after: [sft]", pretrain_lr.sub(r"\g<1>1.0e-3", text, count=1)
                             .replace("en_dpo_demo_messages.jsonl", "other.jsonl", 1), count=1))
    assert edited.read_text() != text
    overrides = ["pretrain.engine.optim.lr=1e-3", "sft.data.sources[1].uri=data/sample/sft/other.jsonl", "eval_after=[sft]"]
    by_set, by_edit, plain = load_config(str(SMOKE), "x", overrides), load_config(str(edited), "x"), load_config(str(SMOKE), "x")
    assert by_set == by_edit and stage_hashes(by_set) == stage_hashes(by_edit)
    changed = {k for k, v in stage_hashes(by_set).items() if stage_hashes(plain).get(k) != v}
    assert changed == {"pretrain", "sft", "eval-sft", "rlhf", "quantize"}  # the data stage is upstream of the change


def test_a_bad_set_names_the_flag_and_the_key():
    with pytest.raises(ConfigError, match=r"^--set sft\.engine\.optim\.lrr=1: .*smoke\.yaml: sft\.engine\.optim: unknown key\(s\) 'lrr'"):
        load_config(str(SMOKE), None, ["name=y", "sft.engine.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set stages=\[sft, data\]: .*must be in pipeline order"):
        load_config(str(SMOKE), None, ["stages=[sft, data]"])


def test_a_changed_preset_changes_the_pretraining_hash(monkeypatch):
    """The hash covers what the preset name stands for: pulling a change to `small` retrains."""
    import dataclasses

    from glm import config as glm_config
    from pipelines.full import fingerprint

    p = load_config(str(SMOKE))
    before = fingerprint(wired(p)["pretrain"])
    small = glm_config.PRESETS["small"]
    monkeypatch.setitem(glm_config.PRESETS, "small", lambda: dataclasses.replace(small(), residual="deepnorm"))
    assert fingerprint(wired(p)["pretrain"]) != before

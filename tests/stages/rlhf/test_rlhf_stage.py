"""The RLHF stage end to end with real Ray Train, DeepSpeed and MLflow on a tiny "SFT"
checkpoint: a reward model from the shipped preference slices and synthetic pairs (held-out
accuracy per family in its effects), then PPO against it; a PPO
worker killed mid-run restarts and reproduces the uninterrupted run's iterations exactly."""

import json

import pytest
import torch

from conftest import SAMPLE
from glm.checkpoint import load_inference_checkpoint, save_inference_checkpoint
from glm.config import padded_vocab_size, preset
from glm.generation import GenerationConfig, chat
from glm.model import GLMModel
from glm.value_head import load_reward_checkpoint
from stages.engine import EngineConfig, OptimConfig
from stages.engine.trainer import final_steps, step_log
from stages.sft.config import SFTSource
from stages.effects import read_effects
from stages.rlhf.config import PPOConfig, PreferenceDataConfig, PreferenceSource, RLHFConfig, SyntheticPairsConfig
from stages.rlhf.stage import run
from stages.tracking import TrackingConfig

pytestmark = pytest.mark.integration
PPO_STEPS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("rlhf_stage")
    torch.manual_seed(0)
    save_inference_checkpoint(GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))), tokenizer,
                              tmp / "sft")
    return tmp


def engine(tmp, name: str, steps: int, **kw) -> EngineConfig:
    return EngineConfig(run_name=name, storage_path=str(tmp / "ray"), num_workers=2, micro_batch_size=2,
                        train_steps=steps, zero_stage=2, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                        checkpoint_every=2, log_every=1, max_failures=2, seed=11, **kw)


@pytest.fixture(scope="module")
def reward_model(base, ray_instance):
    cfg = RLHFConfig(
        mode="reward", base=str(base / "sft"), output=str(base / "rm"),
        data=PreferenceDataConfig(sources=[PreferenceSource(uri=str(SAMPLE / "preference/en_hh_rlhf_harmless_base.jsonl")),
                                           PreferenceSource(uri=str(SAMPLE / "preference/zh_oasst1_pairs.jsonl"))],
                                  synthetic=SyntheticPairsConfig(sources=[SFTSource(uri=str(SAMPLE / "sft/zh_oasst1.jsonl")),
                                                                          SFTSource(uri=str(SAMPLE / "sft/en_dpo_demo_messages.jsonl"))]),
                                  max_len=48, max_prompt_len=24, output=str(base / "pairs")),
        engine=engine(base, "rm", 2, validate_every=2, validation_batches=1))
    result = run(cfg)
    return cfg, result


def ppo_config(base, name: str, **kw) -> RLHFConfig:
    return RLHFConfig(
        mode="ppo", base=str(base / "sft"), reward_model=str(base / "rm"), output=str(base / name / "policy"),
        data=PreferenceDataConfig(sources=[PreferenceSource(uri=str(SAMPLE / "preference/zh_oasst1_pairs.jsonl"))],
                                  max_prompt_len=24, max_samples=40, output=str(base / "prompts")),
        ppo=PPOConfig(max_new_tokens=6, ppo_epochs=2, minibatches=2, kl_coef=0.05, adaptive_kl=True, kl_target=1.0,
                      kl_horizon=100),
        engine=engine(base, name, PPO_STEPS, validate_every=PPO_STEPS, validation_batches=1, **kw),
        tracking=TrackingConfig(enabled=name == "ppo-clean", tracking_uri=f"sqlite:///{base / 'mlflow.db'}",
                                experiment="rlhf-test"),
        sample_prompts=["你好"], max_new_tokens=6)


@pytest.fixture(scope="module")
def clean_ppo(base, reward_model):
    cfg = ppo_config(base, "ppo-clean")
    run(cfg)
    return cfg, final_steps(cfg.engine)


def test_reward_stage_counts_bad_pairs_reports_accuracy_and_exports_a_reward_checkpoint(base, reward_model):
    cfg, result = reward_model
    manifest = json.load(open(base / "pairs" / "manifest.json"))
    assert manifest["sources"]["en_hh_rlhf_harmless_base"]["rejected"] == {"empty_chosen": 1}
    assert manifest["sources"]["zh_oasst1_pairs"]["rejected"] == {"identical_sides": 1}
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0 and "val_margin" in result.metrics
    effects = read_effects(cfg.output)  # every held-out pair scored at export, per family
    families = {"language", "repetition", "truncated", "en_hh_rlhf_harmless_base", "zh_oasst1_pairs"}
    assert {f"heldout_accuracy.{f}" for f in families} <= set(effects)
    assert sum(effects[f"heldout_pairs.{f}"] for f in families) == effects["heldout_pairs"] == \
        manifest["splits"]["validation"]["rows"]
    model, _ = load_reward_checkpoint(cfg.output)
    sft, _ = load_inference_checkpoint(base / "sft")
    assert not torch.equal(model.backbone.layers[0].mlp.dense_h_to_4h.weight, sft.layers[0].mlp.dense_h_to_4h.weight)


def test_killed_ppo_run_resumes_and_reproduces_every_iteration(base, clean_ppo):
    _, clean = clean_ppo
    cfg = ppo_config(base, "ppo-killed", fail_at_steps=[3], fail_rank=1)
    run(cfg)
    assert any(r["attempt"] == 1 for r in step_log(cfg.engine)), "the run was not restarted"
    resumed = final_steps(cfg.engine)
    for s in range(1, PPO_STEPS + 1):
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "response_len"):
            assert resumed[s]["metrics"][key] == clean[s]["metrics"][key], (s, key)  # bitwise in fp32
        assert resumed[s]["indices"] == clean[s]["indices"]  # the same prompts
    assert clean[PPO_STEPS]["metrics"]["kl_coef"] != clean[1]["metrics"]["kl_coef"]  # the controller moved


def test_ppo_logs_its_metrics_and_exports_a_chat_policy(base, clean_ppo):
    import mlflow

    cfg, _ = clean_ppo
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    [r] = client.search_runs([client.get_experiment_by_name("rlhf-test").experiment_id])
    for name in ("reward_mean", "reward_std", "kl", "policy_loss", "value_loss", "clip_frac", "entropy",
                 "response_len", "generation_share"):
        assert len(client.get_metric_history(r.info.run_id, name)) == PPO_STEPS, name
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="rlhf/sample_generations.json",
                                                tracking_uri=cfg.tracking.tracking_uri)
    assert json.load(open(local))[0]["prompt"] == "你好"
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path=f"validation/step{PPO_STEPS:06d}.json",
                                                tracking_uri=cfg.tracking.tracking_uri)
    samples = json.load(open(local))["samples"]  # greedy answers to held-out prompts, with their scores
    assert len(samples) == 2 and all(isinstance(s["response"], str) and "score" in s for s in samples)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_reward")] == [PPO_STEPS]
    policy, tokenizer = load_inference_checkpoint(cfg.output)
    response, _ = chat(policy, tokenizer, "你好", config=GenerationConfig(max_new_tokens=4))
    assert isinstance(response, str)

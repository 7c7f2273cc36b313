"""The SFT stage end to end with real Ray Train, DeepSpeed and MLflow: P-Tuning v2 on a tiny
pretrained checkpoint, a worker killed mid-run, exact resume, export and a chat turn."""

import json

import pytest
import torch

from conftest import SAMPLE
from glm.checkpoint import load_inference_checkpoint, save_inference_checkpoint
from glm.config import padded_vocab_size, preset
from glm.generation import GenerationConfig, chat
from glm.model import GLMModel
from stages.engine import EngineConfig, OptimConfig
from stages.engine.trainer import final_steps, step_log
from stages.sft.config import MethodConfig, SFTConfig, SFTDataConfig, SFTSource
from stages.sft.stage import run
from stages.tracking import TrackingConfig

pytestmark = pytest.mark.integration
STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("sft_stage")
    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer))))
    save_inference_checkpoint(model, tokenizer, tmp / "base")
    return tmp


def sft_config(tmp, name: str, **engine) -> SFTConfig:
    return SFTConfig(
        output=str(tmp / name / "model"), base=str(tmp / "base"),
        data=SFTDataConfig(sources=[SFTSource(uri=str(SAMPLE / "sft/zh_oasst1.jsonl")),
                                    SFTSource(uri=str(SAMPLE / "sft/en_dpo_demo_messages.jsonl"))],
                           seq_len=128, max_samples=30, validation_fraction=0.2, reply_max_tokens=48,
                           output=str(tmp / "data")),
        method=MethodConfig(kind="ptuning", pre_seq_len=4, prefix_projection=True),
        engine=EngineConfig(run_name=name, storage_path=str(tmp / "ray"), num_workers=2, micro_batch_size=2,
                            train_steps=STEPS, zero_stage=2, optim=OptimConfig(lr=1e-2, warmup_steps=1),
                            checkpoint_every=2, log_every=1, validate_every=3, validate_at_start=True,
                            validation_batches=1, max_failures=2, seed=5, **engine),
        tracking=TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment="sft-test"),
        sample_prompts=["你好"], max_new_tokens=8,
    )


@pytest.fixture(scope="module")
def uninterrupted(base, ray_instance):
    cfg = sft_config(base, "clean")
    run(cfg)
    return cfg, final_steps(cfg.engine)


def test_killed_sft_run_resumes_exactly(base, uninterrupted):
    _, clean = uninterrupted
    cfg = sft_config(base, "killed", fail_at_steps=[3], fail_rank=1)
    run(cfg)
    assert any(r["attempt"] == 1 for r in step_log(cfg.engine)), "the run was not restarted"
    resumed = final_steps(cfg.engine)
    assert [resumed[s]["loss"] for s in range(1, STEPS + 1)] == [clean[s]["loss"] for s in range(1, STEPS + 1)]
    assert [resumed[s]["indices"] for s in range(1, STEPS + 1)] == [clean[s]["indices"] for s in range(1, STEPS + 1)]


def test_export_keeps_the_base_and_chats_in_the_chatglm_format(base, uninterrupted):
    cfg, _ = uninterrupted
    tuned, tokenizer = load_inference_checkpoint(cfg.output)
    original, _ = load_inference_checkpoint(base / "base")
    assert tuned.config.pre_seq_len == 4 and not tuned.config.prefix_projection  # MLP folded at export
    base_weights = original.state_dict()
    for name, value in tuned.state_dict().items():
        if not name.startswith("prefix_encoder."):
            assert torch.equal(value, base_weights[name]), name  # P-Tuning v2 changed no base weight
    response, history = chat(tuned, tokenizer, "你好", config=GenerationConfig(max_new_tokens=6))
    assert isinstance(response, str) and history == [("你好", response)]
    response2, history2 = chat(tuned, tokenizer, "再见", history, GenerationConfig(max_new_tokens=6))
    assert history2 == history + [("再见", response2)]


def test_mlflow_run_has_data_counts_losses_and_sample_generations(base, uninterrupted):
    import mlflow

    cfg, _ = uninterrupted
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("sft-test")
    [r] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'clean'")
    assert r.data.params["method.kind"] == "ptuning"
    assert r.data.metrics["data.zh_oasst1.kept"] > 0
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [0, 3, 6]
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="sft/sample_generations.json",
                                                tracking_uri=cfg.tracking.tracking_uri)
    samples = json.load(open(local))
    assert samples[0]["prompt"] == "你好" and isinstance(samples[0]["response"], str)
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(r.info.run_id)}
    # the chat behaviour measured on the held-out prompts the data manifest kept
    held = json.loads((base / "data" / "manifest.json").read_text())["heldout_prompts"]
    effects = json.loads(open(cfg.output + "_effects.json").read())
    assert held and effects["chat_prompts"] == len(held) and [a["prompt"] for a in effects["chat_answers"]] == \
        [p["query"] for p in held]
    for a in effects["chat_answers"]:
        assert a["ended"] == (a["tokens"] < cfg.max_new_tokens)
    assert effects["chat_ended_rate"] == sum(a["ended"] for a in effects["chat_answers"]) / len(held)
    assert r.data.metrics["effect.chat_good_rate"] == effects["chat_good_rate"]


def test_roles_format_sft_on_tool_calls_is_recorded_in_the_checkpoint(base, ray_instance, tmp_path):
    """A short run in the `roles` chat format on OpenAI-style tool-call conversations: the
    exported checkpoint records the format, which is what serve and chat() then render."""
    from glm.chat_format import ROLES, from_metadata
    from glm.checkpoint import read_checkpoint_config

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    rows = [{"tools": [tool], "messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": f"city {i}"})}}]},
        {"role": "tool", "tool_call_id": "c", "content": json.dumps({"temp_c": 10 + i})},
        {"role": "assistant", "content": f"It is {10 + i} degrees."}]} for i in range(12)]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = sft_config(base, "roles")
    cfg.data = SFTDataConfig(sources=[SFTSource(uri=str(path))], seq_len=128, output=str(tmp_path / "data"),
                             chat_format=ROLES)
    cfg.engine.num_workers, cfg.engine.train_steps, cfg.engine.validate_every = 1, 2, 2
    cfg.tracking.enabled = False
    run(cfg)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["chat_format"] == ROLES and manifest["sources"]["tools"]["samples"] == 24  # call + answer
    _, metadata = read_checkpoint_config(cfg.output)
    assert metadata["chat_format"] == ROLES
    model, tokenizer = load_inference_checkpoint(cfg.output)
    fmt = from_metadata(metadata, tokenizer)
    response, _ = chat(model, tokenizer, "Weather in Rome?", config=GenerationConfig(max_new_tokens=4), chat_format=fmt)
    assert isinstance(response, str)

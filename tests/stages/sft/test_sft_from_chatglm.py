"""P-Tuning v2 from an imported ChatGLM-6B checkpoint (a tiny one in the published layout), as
ChatGLM's ptuning example does: the stage's data preparation with ChatGLM's vocabulary, its model
factory, a few optimizer steps, the export, and the tuned model back in the published layout
computing the published forward's logits (prefixes included). The last test runs the real stage
(Ray Train, DeepSpeed, MLflow)."""

import json

import numpy as np
import pytest
import torch

from chatglm_reference import published_inputs, published_logits, random_state, tiny_config, train_ice_text, write_chatglm_dir
from conftest import SAMPLE, sample_texts
from glm.chatglm_hf import export_chatglm, import_chatglm, read_chatglm_weights
from glm.checkpoint import load_inference_checkpoint, save_inference_checkpoint
from stages.engine.config import EngineConfig, OptimConfig
from stages.engine.data import ShardSource
from stages.engine.loop import build_optimizer
from stages.sft.config import MethodConfig, SFTConfig, SFTDataConfig, SFTSource
from stages.sft.stage import base_tokenizer, build_model, inference_model, prepare_data
from stages.tracking import TrackingConfig

quiet = dict(progress=lambda _: None)
METHOD = MethodConfig(kind="ptuning", pre_seq_len=8, prefix_projection=False)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_chatglm")
    ice_text = train_ice_text(sample_texts())
    cfg = tiny_config(ice_text, 0)
    write_chatglm_dir(tmp / "chatglm-6b", cfg, random_state(cfg), ice_text, 0)
    import_chatglm(str(tmp / "chatglm-6b"), str(tmp / "base"), **quiet)
    return tmp


def sft_config(tmp, name: str, steps: int) -> SFTConfig:
    return SFTConfig(
        output=str(tmp / name / "model"), base=str(tmp / "base"),
        data=SFTDataConfig(sources=[SFTSource(uri=str(SAMPLE / "sft/zh_oasst1.jsonl"))], seq_len=128, max_samples=24,
                           output=str(tmp / "data")),
        method=METHOD,
        engine=EngineConfig(run_name=name, storage_path=str(tmp / "ray"), num_workers=1, micro_batch_size=2,
                            train_steps=steps, zero_stage=2, optim=OptimConfig(lr=2e-2, warmup_steps=0, weight_decay=0.0),
                            checkpoint_every=steps, log_every=1, validate_every=steps, validation_batches=1, seed=5),
        tracking=TrackingConfig(enabled=False), sample_prompts=["你好"], max_new_tokens=4,
    )


def test_ptuning_from_an_imported_checkpoint_and_back_to_the_published_layout(imported):
    tmp = imported
    cfg = sft_config(tmp, "in-process", 4)
    manifest = prepare_data(cfg)  # the stage's own data preparation, with the checkpoint's ChatGLM tokenizer
    assert base_tokenizer(cfg.base).convention == "chatglm" and manifest["splits"]["train"]["rows"] > 0
    torch.manual_seed(3)
    model = build_model(cfg.base, cfg.method, {})
    optimizer = build_optimizer(model, EngineConfig(optim=OptimConfig(lr=2e-2, weight_decay=0.0)))
    rows = ShardSource(cfg.data.output, "train").rows(np.arange(2))
    batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in rows.items()}
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    base, tokenizer = load_inference_checkpoint(cfg.base)
    tuned = inference_model(model, cfg.method)
    base_weights = base.state_dict()
    for name, value in tuned.state_dict().items():
        if not name.startswith("prefix_encoder."):
            assert torch.equal(value, base_weights[name]), name  # P-Tuning v2 trains the prefixes only
    save_inference_checkpoint(tuned, tokenizer, tmp / "tuned")
    export_chatglm(str(tmp / "tuned"), str(tmp / "tuned-hf"), **quiet)
    hf = json.loads((tmp / "tuned-hf" / "config.json").read_text())
    assert hf["pre_seq_len"] == 8 and hf["prefix_projection"] is False
    state = {name: t for name, t, _ in read_chatglm_weights(tmp / "tuned-hf", lambda _: None)}
    s = tokenizer.special
    ids = torch.tensor([tokenizer.encode("你好") + [s.gmask, s.sop] + tokenizer.encode("我是")])
    position_ids, attention_mask = published_inputs(ids, hf)
    context = ids[0].tolist().index(s.sop)
    prefix_mask = (torch.arange(ids.shape[1]) < context).long()[None]
    with torch.no_grad():
        expected = published_logits(state, hf, ids, position_ids, attention_mask)
        ours = tuned(ids, position_ids[:, 0], position_ids[:, 1], prefix_mask=prefix_mask).logits
    assert (ours - expected).abs().max().item() <= 1e-5


@pytest.mark.integration
def test_the_sft_stage_runs_ptuning_from_an_imported_checkpoint(imported, ray_instance):
    from stages.sft.stage import run

    cfg = sft_config(imported, "stage", 3)
    run(cfg)
    tuned, tokenizer = load_inference_checkpoint(cfg.output)
    assert tuned.config.pre_seq_len == 8 and tuned.config.rope_fp16_frequencies
    assert tokenizer.convention == "chatglm"
    base, _ = load_inference_checkpoint(cfg.base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in tuned.state_dict().items()
               if not k.startswith("prefix_encoder."))

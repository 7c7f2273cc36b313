"""Pretraining: the GLM model, the data stage's rows and a loss step, plugged into the engine."""

from __future__ import annotations

import functools
import json
import posixpath
from dataclasses import asdict

from glm.config import GLMConfig, padded_vocab_size
from glm.flops import training_flops_per_token
from stages import storage
from stages.engine import TrainSpec, fit, lm_loss_step
from stages.pretrain.config import PretrainConfig
from stages.tracking import active_run_id, default_tracking_uri


def build_model(config: GLMConfig):
    from glm.model import GLMModel

    return GLMModel(config)


def export_checkpoint(model, data_uri: str, output: str, metadata: dict) -> None:
    from glm.checkpoint import save_inference_checkpoint
    from glm.tokenizer import GLMTokenizer

    fs, root = storage.resolve(data_uri)
    tokenizer = GLMTokenizer(storage.read_bytes(fs, posixpath.join(root, GLMTokenizer.MODEL_FILE)))
    save_inference_checkpoint(model, tokenizer, output, metadata=metadata)
    print(f"[pretrain] inference checkpoint written to {output}", flush=True)


def model_config(cfg: PretrainConfig) -> GLMConfig:
    """The model preset fitted to the data: vocab from its tokenizer, positions from its schema."""
    fs, root = storage.resolve(cfg.data)
    path = posixpath.join(root, "manifest.json")
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{cfg.data}: no manifest.json: run the data stage first")
    manifest = json.loads(storage.read_bytes(fs, path))
    schema = manifest["schema"]
    overrides = {"vocab_size": padded_vocab_size(manifest["tokenizer"]["pieces"]),
                 "position_encoding": schema["position_encoding"]}
    config = cfg.model.build(**overrides)
    if config.max_seq_len < schema["seq_len"]:
        config = cfg.model.build(**overrides, max_seq_len=schema["seq_len"])
    return config


def flops_per_token(config: GLMConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (glm.flops: blocks, attention at seq_len, logits; x3)."""
    return training_flops_per_token(config, seq_len)[0]


def run(cfg: PretrainConfig):
    if not cfg.data:
        raise ValueError("pretrain config: `data` (the data stage's output) is not set")
    cfg.data, cfg.output = storage.absolute(cfg.data), storage.absolute(cfg.output)
    config = model_config(cfg)
    tracking_uri = (cfg.tracking.tracking_uri or default_tracking_uri()) if cfg.tracking.enabled else ""
    spec = TrainSpec(
        model_factory=functools.partial(build_model, config),
        data_uri=cfg.data,
        step_fn=lm_loss_step,
        export_fn=functools.partial(export_checkpoint, data_uri=cfg.data, output=cfg.output,
                                    metadata={"stage": "pretrain", "run": cfg.engine.run_name}),
        tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        parent_run_id=active_run_id(),
        params={"model": asdict(config), "data": cfg.data, "output": cfg.output},
        flops_fn=functools.partial(training_flops_per_token, config),  # at the data's sequence length
        grad_norm_params={"embedding_grad_norm": "word_embeddings.weight"},
    )
    return fit(spec, cfg.engine)

"""Pretraining: the GLM model, the data stage's rows and a loss step, plugged into the engine."""

from __future__ import annotations

import functools
import json
import posixpath
from dataclasses import asdict

import numpy as np

from glm.config import ConfigError, GLMConfig, padded_vocab_size
from glm.flops import training_flops_per_token
from stages import storage
from stages.effects import log_effect_metrics, write_effects
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


def validation_perplexity(model, data_uri: str, batch_size: int = 8) -> dict[str, float]:
    """The model's perplexity over every predicted token of the data's validation split (the
    tokens the data stage's count-model baselines are scored on)."""
    import math

    import torch

    from stages.engine.data import ShardSource

    try:
        source = ShardSource(data_uri, "validation")
    except ValueError:  # no validation split
        return {}
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, source.size, batch_size):
            rows = source.rows(np.arange(start, min(start + batch_size, source.size)))
            batch = {k: torch.as_tensor(v, dtype=torch.long, device=next(model.parameters()).device)
                     for k, v in rows.items()}
            targets = int((batch["labels"] != -100).sum())
            if targets:
                nll += float(model(**batch).loss) * targets
                count += targets
    model.train(was_training)
    return {"val_ppl": math.exp(nll / count), "val_tokens": count} if count else {}


def data_baselines(data_uri: str) -> dict[str, float]:
    """The data stage's count-model perplexities on its validation split (manifest `baselines`)."""
    fs, root = storage.resolve(data_uri)
    manifest = json.loads(storage.read_bytes(fs, posixpath.join(root, "manifest.json")))
    b = manifest.get("baselines") or {}
    return {f"baseline_{k}": v for k, v in b.items() if k in ("unigram_ppl", "bigram_ppl")}


def export_and_measure(model, data_uri: str, output: str, metadata: dict) -> dict:
    """Export, then the stage's effect: validation perplexity beside the count-model baselines,
    logged to the run's MLflow metrics and written beside the checkpoint."""
    export_checkpoint(model, data_uri, output, metadata)
    effects: dict = {"stage": "pretrain", **data_baselines(data_uri), **validation_perplexity(model, data_uri)}
    for kind in ("unigram", "bigram"):
        if "val_ppl" in effects and f"baseline_{kind}_ppl" in effects:
            effects[f"val_ppl_over_{kind}"] = effects["val_ppl"] / effects[f"baseline_{kind}_ppl"]
    print("[pretrain] validation: " + "  ".join(f"{k} {v:.4g}" for k, v in effects.items() if k != "stage"), flush=True)
    write_effects(output, effects)
    log_effect_metrics(effects)
    return {"pretrain/effects.json": effects}


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
    from glm.parallel import check_divisible

    try:
        check_divisible(config, cfg.engine.tensor_parallel)
    except ValueError as e:
        raise ConfigError(f"pretrain engine.tensor_parallel: {e}") from None
    tracking_uri = (cfg.tracking.tracking_uri or default_tracking_uri()) if cfg.tracking.enabled else ""
    spec = TrainSpec(
        model_factory=functools.partial(build_model, config),
        data_uri=cfg.data,
        step_fn=lm_loss_step,
        export_fn=functools.partial(export_and_measure, data_uri=cfg.data, output=cfg.output,
                                    metadata={"stage": "pretrain", "run": cfg.engine.run_name}),
        tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        parent_run_id=active_run_id(),
        params={"model": asdict(config), "data": cfg.data, "output": cfg.output},
        start_metrics=data_baselines(cfg.data),  # the count models the validation loss is compared with
        flops_fn=functools.partial(training_flops_per_token, config),  # at the data's sequence length
        grad_norm_params={"embedding_grad_norm": "word_embeddings.weight"},
    )
    return fit(spec, cfg.engine)

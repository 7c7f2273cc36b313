"""SFT: a pretrained inference checkpoint + chat-formatted rows, trained on the engine.

The stage plugs a model factory (base weights + the method's trainable parameters), the GLM
loss step and an export into the same engine pretraining uses; resume, restarts and metrics
come from there. Export writes a plain inference checkpoint: LoRA merged into the weights,
P-Tuning v2 prefixes saved beside the unchanged base weights (their MLP folded away).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import posixpath
from dataclasses import asdict

from stages import storage
from stages.effects import export_with_effects
from stages.engine import TrainSpec, fit, lm_loss_step
from stages.sft.config import MethodConfig, SFTConfig
from stages.tracking import active_run_id, default_tracking_uri


def build_model(base: str, method: MethodConfig, overrides: dict, role_ids: tuple[int, ...] = ()):
    """The base checkpoint's model with the method's trainable parameters; base frozen unless
    `full` (the role tokens' rows `role_ids` trained with it when `method.train_role_tokens`).
    Called on every worker after the same seed, so new parameters match across ranks."""
    from glm.adapters import apply_lora, freeze_all_but, train_rows
    from glm.checkpoint import load_inference_checkpoint
    from glm.model import GLMModel

    model, _ = load_inference_checkpoint(base)
    if method.kind == "ptuning" or overrides:
        extra = {"pre_seq_len": method.pre_seq_len, "prefix_projection": method.prefix_projection,
                 "prefix_hidden_size": method.prefix_hidden_size} if method.kind == "ptuning" else {}
        config = dataclasses.replace(model.config, **overrides, **extra)
        tuned = GLMModel(config)
        missing, unexpected = tuned.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("prefix_encoder.") for k in missing):
            raise ValueError(f"base checkpoint {base} does not match the model: missing {missing}, unexpected {unexpected}")
        model = tuned
    if method.kind == "lora":
        apply_lora(model, method.lora_rank, method.lora_alpha, method.lora_dropout, tuple(method.lora_targets))
    trainable = {"full": (), "ptuning": ("prefix_encoder.",), "lora": ("lora_a", "lora_b")}[method.kind]
    if method.kind != "full" and method.train_role_tokens and role_ids:
        train_rows(model, list(role_ids))
        trainable += (".rows",)
    freeze_all_but(model, trainable)
    return model.train()


def inference_model(model, method: MethodConfig):
    """The trained model as a plain GLMModel for generation and export (in place)."""
    from glm.adapters import fold_prefix_projection, merge_lora

    if method.kind != "full":  # LoRA updates and trained role-token rows written into the weights
        merge_lora(model)
    if method.kind == "ptuning":
        fold_prefix_projection(model)
    return model.eval()


def export_checkpoint(model, base: str, method: MethodConfig, output: str, metadata: dict,
                      prompts: list[str], max_new_tokens: int, heldout_prompts: list[dict] | None = None) -> dict:
    """Write the inference checkpoint; returns sample chat answers for MLflow and, with held-out
    prompts, the chat behaviour the stage taught (`stages.effects.chat_behaviour`)."""
    from glm.chat_format import from_metadata
    from glm.checkpoint import save_inference_checkpoint
    from glm.generation import GenerationConfig, chat
    from stages.effects import chat_behaviour

    tokenizer = base_tokenizer(base)
    model = inference_model(model, method)
    save_inference_checkpoint(model, tokenizer, output, metadata=metadata)
    print(f"[sft] inference checkpoint written to {output}", flush=True)
    config = GenerationConfig(max_new_tokens=max_new_tokens, no_repeat_ngram_size=3)  # greedy, readable
    fmt = from_metadata(metadata, tokenizer)
    samples = [{"prompt": p, "response": chat(model, tokenizer, p, config=config, chat_format=fmt)[0]}
               for p in prompts]
    for s in samples:
        print(f"[sft] sample  {s['prompt']!r} -> {s['response']!r}", flush=True)
    out = {"sft/sample_generations.json": samples}
    if heldout_prompts:
        behaviour = chat_behaviour(model, tokenizer, fmt, heldout_prompts, max_new_tokens)
        print(f"[sft] greedy answers to {behaviour['chat_prompts']} held-out prompts: "
              f"{behaviour['chat_language_rate']:.0%} in the prompt's language, {behaviour['chat_ended_rate']:.0%} "
              f"ended within {max_new_tokens} tokens, {behaviour['chat_sensible_rate']:.0%} not noise; all three "
              f"{behaviour['chat_good_rate']:.0%}", flush=True)
        out["sft/heldout_chat.json"] = behaviour
    return out


def base_tokenizer(base: str):
    """The tokenizer shipped in the base inference checkpoint."""
    from glm.tokenizer import GLMTokenizer

    fs, root = storage.resolve(base)
    path = posixpath.join(root, GLMTokenizer.MODEL_FILE)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{base}: no {GLMTokenizer.MODEL_FILE}: not an inference checkpoint")
    return GLMTokenizer(storage.read_bytes(fs, path))


def prepare_data(cfg: SFTConfig) -> dict:
    """Format and pack the configured sources with the base checkpoint's tokenizer, in the
    configured chat format (empty: the base checkpoint's, else ChatGLM-6B's; set in cfg)."""
    from glm.chat_format import CHATGLM_6B, METADATA_KEY
    from glm.checkpoint import read_checkpoint_config
    from stages.sft.data import prepare

    config, metadata = read_checkpoint_config(cfg.base)
    cfg.data.chat_format = cfg.data.chat_format or metadata.get(METADATA_KEY) or CHATGLM_6B
    if cfg.data.seq_len > config.max_seq_len:
        raise ValueError(f"sft config: data.seq_len {cfg.data.seq_len} exceeds the base model's "
                         f"max_seq_len {config.max_seq_len}")
    tokenizer = base_tokenizer(cfg.base)
    # the rows depend on the base only through its tokenizer and position encoding
    identity = json.dumps({"tokenizer": hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
                           "positions": config.position_encoding})
    return prepare(cfg.data, tokenizer, use_2d=config.uses_2d_positions, fingerprint=cfg.data_fingerprint(identity))


def _data_metrics(manifest: dict) -> dict[str, float]:
    out = {}
    for split, s in manifest["splits"].items():
        out.update({f"data.{split}_rows": s["rows"], f"data.{split}_samples": s["samples"],
                    f"data.{split}_target_tokens": s["target_tokens"]})
    for name, s in manifest["sources"].items():
        out[f"data.{name}.kept"] = s["conversations"]
        out[f"data.{name}.rejected"] = sum(s["rejected"].values())
    return out


def role_token_ids(cfg: SFTConfig) -> tuple[int, ...]:
    """The role tokens of the configured chat format (none in ChatGLM-6B's text format)."""
    from glm.chat_format import ROLES

    if cfg.data.chat_format != ROLES:
        return ()
    return tuple(sorted(base_tokenizer(cfg.base).role_ids.values()))


def run(cfg: SFTConfig):
    """Prepare the data, fine-tune, export; rerunning the same run name resumes."""
    if not cfg.base:
        raise ValueError("sft config: `base` (the pretraining stage's inference checkpoint) is not set")
    cfg.base, cfg.output = storage.checkpoint(cfg.base), storage.absolute(cfg.output)
    cfg.data.output = storage.absolute(cfg.data.output or f"{cfg.output}_data")
    for source in cfg.data.sources:
        source.uri = storage.absolute(source.uri)
    manifest = prepare_data(cfg)
    tracking_uri = (cfg.tracking.tracking_uri or default_tracking_uri()) if cfg.tracking.enabled else ""
    spec = TrainSpec(
        model_factory=functools.partial(build_model, cfg.base, cfg.method, cfg.model_overrides,
                                        role_ids=role_token_ids(cfg)),
        data_uri=cfg.data.output,
        step_fn=lm_loss_step,
        export_fn=functools.partial(
            export_with_effects, output=cfg.output, stage="sft", validation=["val_loss"],
            samples_artifact="sft/sample_generations.json", measures_artifact="sft/heldout_chat.json",
            export=functools.partial(
                export_checkpoint, base=cfg.base, method=cfg.method, output=cfg.output,
                metadata={"stage": "sft", "method": cfg.method.kind, "base": cfg.base, "run": cfg.engine.run_name,
                          "chat_format": cfg.data.chat_format},
                prompts=cfg.sample_prompts, max_new_tokens=cfg.max_new_tokens,
                heldout_prompts=manifest.get("heldout_prompts", []))),
        tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        parent_run_id=active_run_id(),
        params={"stage": "sft", "base": cfg.base, "output": cfg.output, "data": asdict(cfg.data),
                "method": asdict(cfg.method), "model_overrides": cfg.model_overrides},
        artifacts={"sft/data_manifest.json": manifest},
        start_metrics=_data_metrics(manifest),
    )
    return fit(spec, cfg.engine)

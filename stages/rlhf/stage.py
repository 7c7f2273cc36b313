"""The RLHF stage: prepare preference data, then train on the engine in one of three modes.

    reward  ScalarHeadModel(SFT backbone) on pair rows, pairwise loss  -> reward checkpoint
    ppo     PPOModel(actor, critic, reference, reward) on prompt rows, iteration_fn
            = one PPO iteration per engine step                        -> policy checkpoint
    grpo    the same without a critic, k samples per prompt, group-normalised advantages
    rloo    the same, leave-one-out baseline                           -> policy checkpoint
    dpo     DPOModel(policy, reference) on pair rows, DPO loss          -> policy checkpoint

Checkpoints, restarts, exact resume, the data position and MLflow come from the engine.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict

from stages import storage
from stages.effects import export_with_effects
from stages.engine import TrainSpec, fit
from stages.rlhf.config import POLICY_GRADIENT, RLHFConfig
from stages.sft.stage import base_tokenizer
from stages.tracking import active_run_id, default_tracking_uri


def export_reward_model(model, base: str, output: str, metadata: dict, data_uri: str) -> dict:
    """Write the reward checkpoint (backbone inference checkpoint + value_head.safetensors);
    measure its accuracy on every held-out pair, per family (`stages.rlhf.score`)."""
    from glm.value_head import save_reward_checkpoint
    from stages.rlhf.score import effects_of, heldout_accuracy

    save_reward_checkpoint(model, base_tokenizer(base), output, metadata=metadata)
    print(f"[rlhf] reward model written to {output}", flush=True)
    report = heldout_accuracy(model, data_uri)
    print(f"[rlhf] held-out accuracy {report['accuracy']:.3f} on {report['pairs']} pairs: "
          + ", ".join(f"{f} {a:.3f} ({report['family_pairs'][f]})" for f, a in report["by_family"].items()), flush=True)
    return {"rlhf/reward_model.json": {"output": output, **metadata}, "rlhf/heldout_accuracy.json": effects_of(report)}


def export_policy(model, base: str, output: str, metadata: dict, prompts: list[str], max_new_tokens: int) -> dict:
    """Write the trained policy (PPO actor or DPO policy) as an inference checkpoint; returns
    sample chat answers for MLflow."""
    from glm.chat_format import from_metadata
    from glm.checkpoint import save_inference_checkpoint
    from glm.generation import GenerationConfig, chat

    policy = (model.actor if hasattr(model, "actor") else model.policy).eval()
    tokenizer = base_tokenizer(base)
    save_inference_checkpoint(policy, tokenizer, output, metadata=metadata)
    print(f"[rlhf] policy written to {output}", flush=True)
    config = GenerationConfig(max_new_tokens=max_new_tokens, no_repeat_ngram_size=3)
    fmt = from_metadata(metadata, tokenizer)
    samples = [{"prompt": p, "response": chat(policy, tokenizer, p, config=config, chat_format=fmt)[0]}
               for p in prompts]
    for s in samples:
        print(f"[rlhf] sample  {s['prompt']!r} -> {s['response']!r}", flush=True)
    return {"rlhf/sample_generations.json": samples}


def base_chat_format(base: str) -> str:
    """The chat format the base checkpoint records (absent: ChatGLM-6B's)."""
    from glm.chat_format import CHATGLM_6B, METADATA_KEY
    from glm.checkpoint import read_checkpoint_config

    return read_checkpoint_config(base)[1].get(METADATA_KEY) or CHATGLM_6B


def prepare_data(cfg: RLHFConfig) -> dict:
    """Pair or prompt rows in the base checkpoint's chat format."""
    from glm.chat_format import chat_format
    from glm.checkpoint import read_checkpoint_config
    from stages.rlhf.data import prepare

    config, _ = read_checkpoint_config(cfg.base)
    prompts = cfg.mode in POLICY_GRADIENT
    longest = cfg.data.max_prompt_len + cfg.ppo.max_new_tokens + 1 if prompts else cfg.data.max_len
    if longest > config.max_seq_len:
        raise ValueError(f"rlhf config: sequences of {longest} tokens exceed the base model's max_seq_len "
                         f"{config.max_seq_len} (data.max_len, or data.max_prompt_len + ppo.max_new_tokens)")
    tokenizer = base_tokenizer(cfg.base)
    fmt = chat_format(base_chat_format(cfg.base), tokenizer)
    identity = json.dumps({"tokenizer": hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
                           "positions": config.position_encoding, "chat_format": fmt.name})
    return prepare(cfg.data, tokenizer, layout="prompts" if prompts else "pairs",
                   use_2d=config.uses_2d_positions, fingerprint=cfg.data_fingerprint(identity), fmt=fmt)


def _data_metrics(manifest: dict) -> dict[str, float]:
    out = {f"data.{split}_rows": s["rows"] for split, s in manifest["splits"].items()}
    for name, s in manifest["sources"].items():
        out[f"data.{name}.kept"] = s["pairs"]
        out[f"data.{name}.rejected"] = sum(s["rejected"].values())
        out[f"data.{name}.truncated"] = s["truncated"]
    synthetic = manifest.get("synthetic", {})
    for name, s in synthetic.get("sources", {}).items():
        out[f"data.chats.{name}.kept"] = s["chats"]
        out[f"data.chats.{name}.rejected"] = sum(s["rejected"].values())
    for family, s in synthetic.get("families", {}).items():
        for key in ("pairs", "skipped", "truncated"):
            out[f"data.{family}.{key}"] = s[key]
    return out


def train_spec(cfg: RLHFConfig, manifest: dict) -> TrainSpec:
    """The engine's TrainSpec for the configured mode (paths already absolute)."""
    from stages.rlhf import models, ppo, steps

    tokenizer = base_tokenizer(cfg.base)
    metadata = {"stage": "rlhf", "mode": cfg.mode, "base": cfg.base, "run": cfg.engine.run_name,
                "chat_format": base_chat_format(cfg.base)}
    policy_export = functools.partial(export_policy, base=cfg.base, output=cfg.output, metadata=metadata,
                                      prompts=cfg.sample_prompts, max_new_tokens=cfg.max_new_tokens)
    extra = {}
    if cfg.mode == "reward":
        factory = functools.partial(models.build_reward_model, cfg.base, cfg.model_overrides)
        step_fn = steps.reward_step
        # the pair layout, so `stages.rlhf.score` renders pairs and replies as training did
        pairs = {"max_len": cfg.data.max_len, "min_chars": 4 * cfg.data.synthetic.truncated_chars}
        export = functools.partial(export_reward_model, base=cfg.base, output=cfg.output,
                                   metadata={**metadata, "pairs": pairs}, data_uri=cfg.data.output)
    elif cfg.mode == "dpo":
        factory = functools.partial(models.build_dpo_model, cfg.base, cfg.model_overrides)
        step_fn = functools.partial(steps.dpo_step, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)
        export = policy_export
    else:
        if cfg.rewards.model > 0 and not cfg.reward_model and not cfg.rule_reward.enabled:
            raise ValueError(f"rlhf config: mode {cfg.mode} with rewards.model > 0 needs `reward_model` (the reward "
                             f"stage's output) or `rule_reward`; or set rewards.model: 0 and weight rule rewards")
        from glm.chat_format import chat_format

        rule_ids = list(cfg.rule_reward.token_ids) + (tokenizer.encode(cfg.rule_reward.text) if cfg.rule_reward.text else [])
        stop_ids = chat_format(base_chat_format(cfg.base), tokenizer).stop_ids()  # as chat and serving stop replies
        common = {"cfg": cfg.ppo, "rewards": cfg.rewards, "stop_ids": stop_ids}
        factory = functools.partial(models.build_ppo_model, cfg.base, cfg.reward_model, rule_ids, cfg.model_overrides,
                                    cfg.ppo.critic_lr_scale, critic=cfg.mode == "ppo")
        step_fn = functools.partial(ppo.ppo_validation_step, tokenizer=tokenizer, **common)
        common.update(special=tokenizer.special, vocab_limit=len(tokenizer), tokenizer=tokenizer)
        if cfg.mode == "ppo":
            iteration = functools.partial(ppo.ppo_iteration, grad_clip=cfg.engine.optim.grad_clip, **common)
        else:
            iteration = functools.partial(ppo.group_iteration, mode=cfg.mode, **common)
        extra = {"iteration_fn": iteration, "optimizer_steps_per_step": cfg.ppo.ppo_epochs * cfg.ppo.minibatches,
                 "clips_gradients": cfg.mode == "ppo"}
        export = policy_export
    tracking_uri = (cfg.tracking.tracking_uri or default_tracking_uri()) if cfg.tracking.enabled else ""
    # the stage's effect: held-out pair accuracy (reward, DPO), validation reward and KL (PPO, GRPO, RLOO)
    policy_gradient = ["val_reward", "val_reward_std", "val_greedy_reward", "val_kl"]
    validation = {"reward": ["val_accuracy", "val_loss"], "dpo": ["val_reward_accuracy", "val_loss"],
                  **{m: policy_gradient for m in POLICY_GRADIENT}}[cfg.mode]
    export = functools.partial(export_with_effects, export=export, output=cfg.output, stage=cfg.mode,
                               validation=validation, samples_artifact="rlhf/sample_generations.json",
                               measures_artifact="rlhf/heldout_accuracy.json")
    return TrainSpec(
        model_factory=factory, data_uri=cfg.data.output, step_fn=step_fn, export_fn=export,
        tracking_uri=tracking_uri, experiment=cfg.tracking.experiment, parent_run_id=active_run_id(),
        params={"stage": "rlhf", "mode": cfg.mode, "base": cfg.base, "reward_model": cfg.reward_model,
                "output": cfg.output, "data": asdict(cfg.data), "ppo": asdict(cfg.ppo), "dpo": asdict(cfg.dpo),
                "rewards": asdict(cfg.rewards),
                "model_overrides": cfg.model_overrides},
        artifacts={"rlhf/data_manifest.json": manifest}, start_metrics=_data_metrics(manifest), **extra)


def run(cfg: RLHFConfig):
    """Prepare the data, train the configured mode, export; rerunning the same run name resumes."""
    if not cfg.base:
        raise ValueError("rlhf config: `base` (the SFT stage's inference checkpoint) is not set")
    cfg.__post_init__()  # again: the CLI may have changed the mode
    cfg.base, cfg.output = storage.checkpoint(cfg.base), storage.absolute(cfg.output)
    if cfg.reward_model:
        cfg.reward_model = storage.checkpoint(cfg.reward_model)
    if cfg.ppo.ptx_data:
        cfg.ppo.ptx_data = storage.absolute(cfg.ppo.ptx_data)
    cfg.data.output = storage.absolute(cfg.data.output or f"{cfg.output}_data")
    for source in [*cfg.data.sources, *cfg.data.synthetic.sources]:
        source.uri = storage.absolute(source.uri)
    print(f"[rlhf] mode {cfg.mode}: base {cfg.base} -> {cfg.output}", flush=True)
    manifest = prepare_data(cfg)
    return fit(train_spec(cfg, manifest), cfg.engine)

"""PPO, GRPO and RLOO side by side on the same budget, from one SFT checkpoint and one reward
checkpoint, in one process (the stage's own iteration and validation functions on a LocalEngine:
the engine's optimizer, schedule and clipping without Ray / DeepSpeed).

    python benchmarks/rlhf_effect.py --run runs/smoke [--methods ppo,grpo,rloo] [--iterations 8] \
        [--rollouts 16] [--samples-per-prompt 4] [--lr 1e-4] [--rewards model=1,language=0.5,...]
    python benchmarks/rlhf_effect.py --sft SFT_CHECKPOINT --reward REWARD_CHECKPOINT ...

`--run` is a pipeline work dir (`make smoke` writes runs/smoke): its SFT and reward
checkpoints are used, and the effects the earlier stages measured (pretraining's validation
perplexity against unigram / bigram models; per language, with its goals, from `python
benchmarks/learning.py --checkpoint RUN/pretrain/model`), SFT's held-out loss and chat behaviour, the reward
model's held-out accuracy per family) go into the JSON beside RL's, each with its goal.

Budget: every method samples `--rollouts` responses per iteration for `--iterations` iterations
(PPO: that many prompts; GRPO / RLOO: rollouts / k prompts, k samples each), with the same
optimizer steps per iteration (ppo_epochs x minibatches). Before and after training, each
policy answers `--held-out` prompts of the last preference rows (never trained on): the
greedy answers' mean reward (the headline), seeded samples' mean reward and its std, KL per
token to the reference on those samples, and sample answers. The rewards are weighted as
`--rewards` says (default: the smoke config's, the reward model plus rule rewards). RL's goal:
the greedy answers' mean reward rises by at least one standard deviation of the reward over
the seeded samples before training, with KL per token to the reference <= 0.5
(`greedy_gain_in_std`, `goal_met`). Progress goes to stdout; the last line is one JSON object
{"rl": {method: {...}}, "stages": {...}, "goals": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SOURCES = ("data/sample/preference/en_hh_rlhf_harmless_base.jsonl", "data/sample/preference/zh_oasst1_pairs.jsonl")


RL_GOAL_STD, RL_GOAL_KL = 1.0, 0.5
SMOKE_REWARDS = "model=1,language=0.5,format=0.5,repetition=0.5"
STAGE_GOALS = {  # effect file of a pipeline work dir -> {measure: (goal, "min" | "max")}
    "pretrain/model_effects.json": {},  # per language: `python benchmarks/learning.py --checkpoint RUN/pretrain/model`
    "sft/model_effects.json": {"val_loss_drop": (0.20, "min"), "chat_good_rate": (0.80, "min")},
    "rlhf/reward_model_effects.json": {f"heldout_accuracy.{f}": (0.9, "min")
                                       for f in ("language", "repetition", "truncated")},
}


def stage_effects(run: str) -> tuple[dict, dict]:
    """The scalar effects each earlier stage of a pipeline work dir measured, and each goal's
    {value, goal, met} (a measure the stage did not record is reported as missing)."""
    stages, goals = {}, {}
    for name, wanted in STAGE_GOALS.items():
        path = Path(run) / name
        effects = json.loads(path.read_text()) if path.exists() else {}
        if "val_loss_before" in effects and "val_loss_after" in effects:
            effects["val_loss_drop"] = 1 - effects["val_loss_after"] / effects["val_loss_before"]
        stages[name.removesuffix("_effects.json")] = {
            k: v for k, v in effects.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for measure, (goal, sense) in wanted.items():
            value = effects.get(measure)
            goals[measure] = {"value": value, "goal": goal, "sense": sense,
                              "met": value is not None and (value >= goal if sense == "min" else value <= goal)}
    return stages, goals


def prompt_rows(tokenizer, chat_format_name: str, sources: list[str], max_prompt_len: int) -> list[dict]:
    """Prompt rows (Part A + [gMASK]) of the preference rows that parse, in file order, sources interleaved."""
    from glm.chat_format import chat_format
    from stages.rlhf.data import parse_pair, prompt_ids, prompt_row

    fmt = chat_format(chat_format_name, tokenizer)
    per_source = []
    for source in sources:
        rows = []
        for line in open(REPO / source if not Path(source).is_absolute() else source, encoding="utf-8"):
            try:
                rows.append(prompt_row(prompt_ids(parse_pair(json.loads(line)), fmt), tokenizer, max_prompt_len))
            except ValueError:
                continue
        per_source.append(rows)
    return [r for group in zip(*per_source) for r in group]


def batch_of(rows: list[dict]) -> dict:
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def evaluate(engine, held_out: dict, cfg, tokenizer, rewards, stop_ids) -> dict:
    import torch

    from stages.rlhf.ppo import ppo_validation_step

    engine.eval()
    with torch.no_grad():
        out = ppo_validation_step(engine, held_out, cfg, tokenizer, rewards, stop_ids)
    engine.train()
    metrics = {k: round(float(out[k]), 4) for k in ("greedy_reward", "reward", "reward_std", "kl", "truncated")
               if k in out}
    return {**metrics, "samples": out["samples"][:3]}


def run_method(method: str, args, rows: list[dict], held_out: dict, tokenizer, stop_ids, log=print) -> dict:
    import torch

    from stages.engine.config import EngineConfig, OptimConfig
    from stages.engine.local import LocalEngine
    from stages.engine.loop import IterationContext
    from stages.rlhf.config import PPOConfig, RewardsConfig
    from stages.rlhf.models import build_ppo_model
    from stages.rlhf.ppo import group_iteration, ppo_iteration

    torch.manual_seed(0)
    cfg = PPOConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, ppo_epochs=args.ppo_epochs,
                    minibatches=args.minibatches, kl_coef=args.kl_coef, samples_per_prompt=args.samples_per_prompt,
                    validation_samples=args.validation_samples)
    rewards = RewardsConfig(**args.reward_weights)
    overrides = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    model = build_ppo_model(args.sft, args.reward, [], overrides, critic=method == "ppo")
    steps = cfg.ppo_epochs * cfg.minibatches
    engine = LocalEngine(model, EngineConfig(train_steps=args.iterations, optim=OptimConfig(
        lr=args.lr, warmup_steps=1, weight_decay=0.0, min_lr_ratio=1.0)), steps, clips_gradients=method == "ppo")
    before = evaluate(engine, held_out, cfg, tokenizer, rewards, stop_ids)
    log(f"[{method}] before: greedy reward {before['greedy_reward']}, sampled {before.get('reward')}")
    per_iteration = args.rollouts if method == "ppo" else max(1, args.rollouts // cfg.samples_per_prompt)
    state: dict = {}
    t0 = time.time()
    for it in range(args.iterations):
        chunk = [rows[(it * per_iteration + i) % len(rows)] for i in range(per_iteration)]
        ctx = IterationContext(step=it, rank=0, world=1, seed=args.seed, state=state)
        common = dict(rewards=rewards, tokenizer=tokenizer, stop_ids=stop_ids)
        if method == "ppo":
            m = ppo_iteration(engine, batch_of(chunk), ctx, cfg, tokenizer.special, len(tokenizer), **common)
        else:
            m = group_iteration(engine, batch_of(chunk), ctx, cfg, tokenizer.special, len(tokenizer), method, **common)
        log(f"[{method}] iteration {it + 1}/{args.iterations}: reward {m['reward_mean']:.4f} kl {m['kl']:.4f} "
            f"truncated {m['truncated']:.2f} ({time.time() - t0:.0f}s)")
    after = evaluate(engine, held_out, cfg, tokenizer, rewards, stop_ids)
    log(f"[{method}] after: greedy reward {after['greedy_reward']}, sampled {after.get('reward')}")
    std = before.get("reward_std") or 0.0
    gain = (after["greedy_reward"] - before["greedy_reward"]) / std if std else None
    return {"greedy_reward_before": before["greedy_reward"], "greedy_reward_after": after["greedy_reward"],
            "reward_std_before": std, "greedy_gain_in_std": None if gain is None else round(gain, 3),
            "goal_met": gain is not None and gain >= RL_GOAL_STD and (after.get("kl") or 0.0) <= RL_GOAL_KL,
            "sampled_reward_before": before.get("reward"), "sampled_reward_after": after.get("reward"),
            "reward_std_after": after.get("reward_std"), "kl_per_token_after": after.get("kl"),
            "truncated_after": after.get("truncated"), "samples_after": after["samples"],
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="a pipeline work dir (e.g. runs/smoke): its SFT and reward "
                        "checkpoints, and the earlier stages' measured effects")
    parser.add_argument("--sft", default="", help="the SFT stage's inference checkpoint (default: RUN/sft/model)")
    parser.add_argument("--reward", default="", help="the reward stage's checkpoint (default: RUN/rlhf/reward_model)")
    parser.add_argument("--rewards", default=SMOKE_REWARDS,
                        help="reward weights name=weight,... (model, language, length, repetition, format)")
    parser.add_argument("--methods", default="ppo,grpo,rloo")
    parser.add_argument("--sources", default=",".join(SOURCES), help="preference JSONL files (their prompts)")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=16, help="sampled responses per iteration, every method")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=8, help="prompts held out for the before / after numbers")
    parser.add_argument("--validation-samples", type=int, default=4, help="seeded samples per held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    args.sft = args.sft or (args.run and f"{args.run}/sft/model")
    args.reward = args.reward or (args.run and f"{args.run}/rlhf/reward_model")
    if not args.sft or not args.reward:
        parser.error("give --run, or both --sft and --reward")
    from glm.config import ConfigError
    from stages.rlhf.config import RewardsConfig

    try:
        args.reward_weights = {k.strip(): float(v) for k, v in (item.split("=") for item in args.rewards.split(","))}
        RewardsConfig(**args.reward_weights)  # an unknown name or a bad weight fails here, not after loading models
    except (ValueError, TypeError, ConfigError) as e:
        parser.error(f"--rewards must be name=weight,... (model, language, length, repetition, format): "
                     f"got {args.rewards!r} ({e})")

    import torch

    from glm.checkpoint import read_checkpoint_config
    from glm.chat_format import METADATA_KEY, CHATGLM_6B, chat_format
    from stages.sft.stage import base_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = base_tokenizer(args.sft)
    fmt_name = read_checkpoint_config(args.sft)[1].get(METADATA_KEY) or CHATGLM_6B
    stop_ids = chat_format(fmt_name, tokenizer).stop_ids()
    rows = prompt_rows(tokenizer, fmt_name, args.sources.split(","), args.max_prompt_len)
    if len(rows) <= args.held_out:
        raise SystemExit(f"only {len(rows)} prompts: fewer than --held-out {args.held_out} + 1")
    train, held_out = rows[:-args.held_out], batch_of(rows[-args.held_out:])
    print(f"{len(train)} training prompts, {args.held_out} held out; chat format {fmt_name}", flush=True)
    results = {m: run_method(m, args, train, held_out, tokenizer, stop_ids) for m in args.methods.split(",")}
    stages, goals = stage_effects(args.run) if args.run else ({}, {})
    for m, r in results.items():
        goals[f"rl.{m}"] = {"value": r["greedy_gain_in_std"], "goal": RL_GOAL_STD, "kl": r["kl_per_token_after"],
                            "kl_goal": RL_GOAL_KL, "met": r["goal_met"]}
    print(json.dumps({"rl": results, "stages": stages, "goals": goals}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

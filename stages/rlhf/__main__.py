"""python -m stages.rlhf --config FILE [--set KEY=VALUE ...] [--mode reward|ppo|grpo|rloo|dpo] [--base DIR]
                         [--reward-model DIR] [--output DIR] [--run-name NAME] [--track]

RLHF after SFT, on the training engine (Ray Train + DeepSpeed; rerunning the same run name
resumes from the last checkpoint; a crashed worker restarts the run automatically):

  reward  trains a reward model (SFT backbone + scalar head at the response's last token) on
          preference pairs rendered in the ChatGLM format, loss -log sigmoid(r_chosen -
          r_rejected); reports accuracy, margin and reward mean/std (held out: val_*);
          writes a reward checkpoint (inference checkpoint + value_head.safetensors).
  ppo     trains the SFT policy against the reward model (or a rule) with PPO: sampled
          rollouts (KV cache, batched), per-token KL penalty to the frozen SFT reference,
          GAE, clipped policy and value losses; writes the policy as an inference checkpoint.
  grpo    critic-free: samples_per_prompt responses per prompt, group-normalised advantages,
          clipped policy loss + k3 KL to the reference (DeepSeekMath).
  rloo    critic-free: samples_per_prompt responses per prompt, leave-one-out baseline, KL
          in the sequence reward (Ahmadian et al. 2024).
          ppo / grpo / rloo: the reward is rewards.model x the reward model (or rule_reward)
          plus weighted rule rewards (language, length, repetition, format).
  dpo     trains the SFT policy with DPO on the same pairs against the frozen SFT reference.

Malformed pairs are counted per reason in the prepared data's manifest and skipped.
Typical order:  --mode reward  ->  --mode ppo --reward-model <reward output>.
"""

import argparse
import sys

from stages.cli import add_set_argument, load_config_or_exit, run_stage
from stages.rlhf.config import MODES, RLHFConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.rlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of RLHFConfig fields")
    add_set_argument(parser)
    parser.add_argument("--mode", choices=MODES, help="override mode")
    parser.add_argument("--base", help="override the SFT inference checkpoint to start from")
    parser.add_argument("--reward-model", help="override the reward checkpoint (ppo, grpo, rloo)")
    parser.add_argument("--output", help="override where the exported checkpoint goes")
    parser.add_argument("--run-name", help="override engine.run_name (same name = resume)")
    parser.add_argument("--track", action="store_true", help="log to MLflow")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(RLHFConfig, args.config, args.overrides)
    cfg.mode = args.mode or cfg.mode
    cfg.base = args.base or cfg.base
    cfg.reward_model = args.reward_model or cfg.reward_model
    cfg.output = args.output or cfg.output
    cfg.engine.run_name = args.run_name or cfg.engine.run_name
    cfg.tracking.enabled = cfg.tracking.enabled or args.track
    from stages.rlhf.stage import run

    return run_stage(run, cfg, cfg.output)


if __name__ == "__main__":
    sys.exit(main())

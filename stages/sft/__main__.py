"""python -m stages.sft --config FILE [--set KEY=VALUE ...] [--base DIR] [--output DIR] [--method full|ptuning|lora] [--run-name NAME] [--track]

Fine-tunes a pretrained inference checkpoint into a chat model:
  1. reads the instruction / dialogue JSONL sources (Alpaca, ShareGPT `conversations`, OpenAI
     `messages`), renders them in ChatGLM's multi-round prompt and packs them into rows of the
     sample schema (prompt = bidirectional prefix, labels on the response and [eop] only);
     rows that fit no shape are counted per reason and reported, not fatal;
  2. trains with the engine (Ray Train + DeepSpeed; rerunning the same run name resumes from
     the last checkpoint; a crashed worker restarts the run automatically);
  3. exports an inference checkpoint (LoRA merged; P-Tuning v2 prefixes beside the base
     weights) and answers `sample_prompts` with it (printed and logged to MLflow).
"""

import argparse
import sys

from stages.cli import add_set_argument, load_config_or_exit, run_stage
from stages.sft.config import SFTConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of SFTConfig fields")
    add_set_argument(parser)
    parser.add_argument("--base", help="override the inference checkpoint to start from (pretrained here, or imported "
                        "with python -m glm.chatglm_hf import, or an MLflow models:/ URI)")
    parser.add_argument("--output", help="override where the fine-tuned checkpoint goes")
    parser.add_argument("--method", choices=("full", "ptuning", "lora"), help="override method.kind")
    parser.add_argument("--run-name", help="override engine.run_name (same name = resume)")
    parser.add_argument("--track", action="store_true", help="log to MLflow")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(SFTConfig, args.config, args.overrides)
    cfg.base = args.base or cfg.base
    cfg.output = args.output or cfg.output
    cfg.method.kind = args.method or cfg.method.kind
    cfg.engine.run_name = args.run_name or cfg.engine.run_name
    cfg.tracking.enabled = cfg.tracking.enabled or args.track
    from stages.sft.stage import run

    return run_stage(run, cfg, cfg.output)


if __name__ == "__main__":
    sys.exit(main())

"""python -m stages.pretrain --config FILE [--set KEY=VALUE ...] [--data URI] [--output URI] [--run-name NAME] [--track]

Trains the configured GLM preset on a data-stage output with Ray Train + DeepSpeed, saving
checkpoints every engine.checkpoint_every steps; rerunning the same run name resumes from the
last checkpoint. At the end the inference checkpoint is written to the output.
"""

import argparse
import sys

from stages.cli import add_set_argument, load_config_or_exit, run_stage
from stages.pretrain.config import PretrainConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of PretrainConfig fields")
    add_set_argument(parser)
    parser.add_argument("--data", help="override the data-stage output to train on")
    parser.add_argument("--output", help="override where the inference checkpoint goes")
    parser.add_argument("--run-name", help="override engine.run_name (same name = resume)")
    parser.add_argument("--track", action="store_true", help="log to MLflow")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(PretrainConfig, args.config, args.overrides)
    cfg.data = args.data or cfg.data
    cfg.output = args.output or cfg.output
    cfg.engine.run_name = args.run_name or cfg.engine.run_name
    cfg.tracking.enabled = cfg.tracking.enabled or args.track
    from stages.pretrain.stage import run

    return run_stage(run, cfg, cfg.output, {FileNotFoundError: 2})


if __name__ == "__main__":
    sys.exit(main())

"""python -m stages.eval --checkpoint DIR [--tasks PATH...] [--set KEY=VALUE ...] [--output URI] [--track]

Scores an inference checkpoint (FP or quantized) on GLM-130B-style task YAMLs: multiple
choice, generation and language modelling. PATH is a task YAML or a directory searched
recursively (default: stages/eval/tasks, the shipped tasks on data/sample/eval). Prints and
writes a table like lm-evaluation-harness's (value, standard error, chance and majority
baselines, version, n-shot per task and metric) beside a JSON report of its own per run;
with --track, logs `<task>/<metric>` and `<group>/<metric>` (and `_stderr`) to MLflow.

Examples:
  python -m stages.eval --checkpoint runs/smoke/sft/model
  python -m stages.eval --checkpoint runs/smoke/sft/model --tasks stages/eval/tasks/en --max-items 50
  python -m stages.eval --checkpoint s3://bucket/ckpt --tasks stages/eval/shared_tasks --track
"""

import argparse
import sys

from glm.config import ConfigError
from stages.cli import add_set_argument, load_config_or_exit
from stages.eval.config import EvalConfig
from stages.eval.report import table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of EvalConfig fields (flags below override it)")
    add_set_argument(parser)
    parser.add_argument("--checkpoint", help="inference checkpoint directory or URI")
    parser.add_argument("--tasks", nargs="+", help="task YAML files or directories (recursive)")
    parser.add_argument("--output", help="where the JSON report goes; {run_name} and {time} are filled in "
                                          "(default runs/eval/{run_name}-{time}.json, a new file per run)")
    parser.add_argument("--log-samples", action="store_true", default=None,
                        help="also write each item's prompt, target, prediction and scores (.samples.jsonl beside the report)")
    parser.add_argument("--batch-size", type=int, help="items per forward pass (default 16)")
    parser.add_argument("--max-items", type=int, help="score only the first N items of every task")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--parallel", choices=["auto", "ray", "local"],
                        help="ray: tasks as parallel Ray tasks; local: one by one here; auto: Ray if it is up")
    parser.add_argument("--track", action="store_true", help="log to MLflow (MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = parser.parse_args(argv)
    if not (args.config or args.checkpoint or args.overrides):
        parser.error("give --checkpoint (or --config with a checkpoint field)")
    start = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    cfg = load_config_or_exit(EvalConfig, args.config, args.overrides, start)
    for name in ("checkpoint", "tasks", "output", "batch_size", "max_items", "device", "parallel", "log_samples"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.tracking.enabled = cfg.tracking.enabled or args.track
    from stages.eval.stage import run

    try:
        EvalConfig.__post_init__(cfg)
        report = run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{table(report)}")
    print(f"report: {report['report_uri']}\ntable: {report['table_uri']}")
    if "samples_uri" in report:
        print(f"samples: {report['samples_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m stages.data --config FILE [--set KEY=VALUE ...] [--output URI] [--workers N] [--track]

Reads the corpora and MIP sets named in the config, cleans and screens them (Gopher quality
rules, language identification, decontamination against the evaluation tasks), removes exact
and near-duplicates (MinHash LSH), trains (or reuses) the tokenizer, builds GLM blank-infilling rows mixed with MIP rows, and writes Parquet
shards (train/, validation/), tokenizer.model, manifest.json, rejected/<rule>.jsonl samples and
dedup_clusters.parquet to the output. A complete output for the same config and unchanged input
files is reused, not rebuilt.
"""

import argparse
import json
import sys

from stages.cli import add_set_argument, load_config_or_exit
from stages.data.config import DataConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of DataConfig fields (see stages/data/configs/)")
    add_set_argument(parser)
    parser.add_argument("--output", help="override the config's output path or URI")
    parser.add_argument("--workers", type=int, help="override the concurrent tasks of the tokenization step")
    parser.add_argument("--track", action="store_true", help="log to MLflow (tracking.enabled)")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(DataConfig, args.config, args.overrides)
    if args.output:
        cfg.output = args.output
    if args.workers:
        cfg.workers = args.workers
    if args.track:
        cfg.tracking.enabled = True
    from stages.data.stage import MANIFEST, run

    try:
        out = run(cfg)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": out, "manifest": f"{out.rstrip('/')}/{MANIFEST}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

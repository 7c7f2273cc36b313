"""The whole recipe as one pipeline: data -> pretrain -> sft -> rlhf -> quantize -> serve,
with evaluation after each training stage and after quantization.

    python -m pipelines.full --config pipelines/configs/smoke.yaml            (one machine)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/full.py --config pipelines/configs/chatglm_6b.yaml   (a Ray cluster)

Each stage gets the URIs of the previous stages' outputs. A stage whose complete output for
the same config exists is skipped (a finished pipeline rerun does nothing and says so); a
training stage interrupted by a crash continues from its last checkpoint when the pipeline
is rerun with the same name. `--only STAGE` runs one stage (its inputs must exist), `--from
STAGE` starts there; `--set sft.engine.optim.lr=1e-3` changes a key of the YAML (repeatable; the
same checks and stage hashes as an edited file). MLflow: one parent run per pipeline run, a nested run per stage, the
final model registered in the Model Registry (a version per run, alias `newest`).
"""

# This file is the command line; the pipeline itself is split by concern:
#   pipelines/config.py    PipelineConfig and its sections
#   pipelines/wiring.py    the stage registry: typed configs, input wiring, load_config
#   pipelines/markers.py   config hashes (the chain) and the finished-stage markers
#   pipelines/runs.py      run identity: engine runs keyed by config hash, --resume-from-run
#   pipelines/driver.py    running the stages: skip, run, evaluate, register, check
#   pipelines/tracking.py  the MLflow parent run and the model registry
#   pipelines/endpoint.py  the requests sent to the endpoint at the end

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/full.py` (what `ray job submit` runs)
    # Python put this file's folder first on sys.path: take it off (its modules would shadow
    # top-level ones named config, tracking, ...) and put the repo root there instead.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

from glm.config import ConfigError  # noqa: E402
from pipelines.config import ORDER, CheckConfig, PipelineConfig, RegistryConfig  # noqa: E402,F401
from pipelines.driver import evaluate, run, selected_stages  # noqa: E402,F401
from pipelines.endpoint import check  # noqa: E402,F401
from pipelines.markers import Markers, fingerprint  # noqa: E402,F401
from pipelines.runs import apply_resume_from  # noqa: E402
from stages.cli import add_set_argument  # noqa: E402
from stages.cluster import shutdown_ray  # noqa: E402

__all__ = ["CheckConfig", "Markers", "ORDER", "PipelineConfig", "RegistryConfig", "STAGES", "check", "eval_config",
           "evaluate", "final_model", "fingerprint", "load_config", "main", "run", "selected_stages", "stage_config"]
from pipelines.wiring import STAGES, eval_config, final_model, load_config, stage_config  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/full.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (pipelines/configs/*.yaml)")
    parser.add_argument("--only", choices=ORDER, help="run only this stage (its inputs must exist)")
    parser.add_argument("--from", dest="start", choices=ORDER, help="start at this stage (earlier outputs must exist)")
    parser.add_argument("--run-name", default=os.environ.get("GLM_RUN_NAME"),
                        help="pipeline name override (default: the config's `name`, or $GLM_RUN_NAME); "
                             "the same name skips finished stages and resumes an interrupted one")
    parser.add_argument("--resume-from-run", action="append", default=[], metavar="RUN=NAME",
                        help="start the engine run RUN (pretrain, sft, reward, ppo, grpo, rloo, dpo) from the newest "
                             "checkpoint of run NAME (an engine run name under <work_dir>/ray, or a run or "
                             "checkpoint directory path / URI) when it has none of its own: continue an "
                             "earlier run after changing the config (by default a changed config trains "
                             "anew); repeatable")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    try:
        p = load_config(args.config, args.run_name, args.overrides)
        apply_resume_from(p, args.resume_from_run)
        run(p, only=args.only, start=args.start)
    except (ConfigError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_ray()  # a local instance (and its endpoint) goes with the driver, no process left behind
    return 0


if __name__ == "__main__":
    sys.exit(main())

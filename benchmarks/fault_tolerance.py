"""Fault tolerance of the training engine: the same tiny training uninterrupted and with
injected kills (os._exit on one rank) at random steps, in the same run.

    python benchmarks/fault_tolerance.py [--steps 24] [--kills 3] [--seed 0]

Prints progress, then one JSON line: losses_identical, samples_lost, samples_repeated,
goodput (useful step time / wall time of the faulty run), restarts, wall times.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from sample_data import build_sample_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="chooses the kill steps")
    args = parser.parse_args()

    from glm.config import ModelSpec
    from stages.engine import EngineConfig, OptimConfig, TrainSpec, fit, lm_loss_step
    from stages.engine.trainer import final_steps, step_log
    from stages.pretrain.config import PretrainConfig
    from stages.pretrain.stage import build_model, model_config

    work = Path(tempfile.mkdtemp(prefix="ft_bench_"))
    try:
        data = build_sample_data(work, seq_len=128)
        config = model_config(PretrainConfig(data=data, output="", model=ModelSpec("tiny", {"hidden_dropout": 0.1})))
        spec = TrainSpec(model_factory=functools.partial(build_model, config), data_uri=data, step_fn=lm_loss_step)
        # kill steps: one per checkpoint interval, so each restart has a newer checkpoint to resume from
        rng = random.Random(args.seed)
        intervals = rng.sample(range(1, args.steps // args.checkpoint_every), args.kills)
        kills = sorted(i * args.checkpoint_every + rng.randrange(1, args.checkpoint_every) for i in intervals)

        def engine(name: str, **kw) -> EngineConfig:
            return EngineConfig(run_name=name, storage_path=str(work / "ray"), num_workers=2, micro_batch_size=2,
                                train_steps=args.steps, zero_stage=2, optim=OptimConfig(lr=1e-3, warmup_steps=2),
                                checkpoint_every=args.checkpoint_every, log_every=args.steps, max_failures=args.kills,
                                seed=11, **kw)

        results = {}
        for name, kw in (("uninterrupted", {}), ("faulty", {"fail_at_steps": kills, "fail_rank": 1})):
            print(f"{name} run ({args.steps} steps, 2 workers{', kills at steps ' + str(kills) if kw else ''}) ...",
                  flush=True)
            cfg = engine(name, **kw)
            t = time.perf_counter()
            fit(spec, cfg)
            results[name] = {"wall": time.perf_counter() - t, "final": final_steps(cfg), "log": step_log(cfg)}
            print(f"  {results[name]['wall']:.1f}s", flush=True)

        clean, faulty = results["uninterrupted"]["final"], results["faulty"]["final"]
        steps = range(1, args.steps + 1)
        identical = all(clean[s]["loss"] == faulty[s]["loss"] for s in steps)
        expected = [i for s in steps for i in clean[s]["indices"]]
        got = [i for s in steps for i in faulty[s]["indices"]]
        lost = len(set(expected) - set(got))
        repeated = len(got) - len(set(got)) - (len(expected) - len(set(expected)))
        restarts = max(r["attempt"] for r in results["faulty"]["log"])
        useful = sum(faulty[s]["seconds"] for s in steps)
        result = {
            "benchmark": "fault_tolerance", "steps": args.steps, "kills_at": kills, "restarts": restarts,
            "losses_identical": identical, "samples_lost": lost, "samples_repeated": repeated,
            "goodput": round(useful / results["faulty"]["wall"], 4),
            "goodput_uninterrupted": round(sum(clean[s]["seconds"] for s in steps) / results["uninterrupted"]["wall"], 4),
            "wall_seconds": round(results["faulty"]["wall"], 1),
            "baseline_wall_seconds": round(results["uninterrupted"]["wall"], 1),
            "goal": {"losses_identical": True, "samples_lost": 0, "samples_repeated": 0},
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

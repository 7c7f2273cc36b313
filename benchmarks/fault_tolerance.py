"""Fault tolerance of the training engine: the same tiny training uninterrupted and with
injected kills (os._exit on one rank), compared step by step.

    python benchmarks/fault_tolerance.py [--steps 24] [--kills 3] [--grad-accum N] [--zero S]
        [--offload] [--nan-at STEP[,STEP]] [--kill-in-checkpoint] [--resume-workers M]

Both runs use 2 Ray Train workers. Kills land at random steps, one per checkpoint interval
(with --kill-in-checkpoint: inside the checkpoint write that follows, after the killed rank
wrote its shard and before the checkpoint is complete). Ray Train restarts the worker group
after each kill; with --resume-workers M the benchmark restarts the run itself instead,
alternating M and 2 workers (2 -> M -> 2 ...) at the same global batch. --nan-at makes one
micro-batch of one rank return a NaN loss at those steps (1-based) in both runs.

Prints progress, then one JSON line: losses_identical, max_loss_rel_diff (against the
uninterrupted run), samples_lost, samples_repeated, restarts, nonfinite_steps_skipped,
replicas_identical (parameter hashes equal across ranks at the end), checkpoints_rejected
(incomplete checkpoints a restart skipped), goodput and wall times.
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
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per worker per step")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="optimizer state offloaded to the CPU (ZeRO 2/3)")
    parser.add_argument("--nan-at", default="", help="comma-separated steps (1-based) with a NaN micro-batch")
    parser.add_argument("--kill-in-checkpoint", action="store_true", help="kills land inside checkpoint writes")
    parser.add_argument("--resume-workers", type=int, default=0,
                        help="restarts alternate this many workers and 2 (driver-level restarts)")
    args = parser.parse_args()
    if args.offload and args.zero < 2:
        parser.error("--offload needs --zero 2 or 3")

    from glm.config import ModelSpec
    from stages.engine import EngineConfig, OptimConfig, TrainSpec, fit, lm_loss_step
    from stages.engine.trainer import events, final_steps, step_log
    from stages.pretrain.config import PretrainConfig
    from stages.pretrain.stage import build_model, model_config

    work = Path(tempfile.mkdtemp(prefix="ft_bench_"))
    try:
        data = build_sample_data(work, seq_len=128)
        # dropout 0: a run resumed with another worker count draws its dropout masks differently
        dropout = 0.0 if args.resume_workers else 0.1
        config = model_config(PretrainConfig(data=data, output="", model=ModelSpec("tiny", {"hidden_dropout": dropout})))
        nan_steps = [int(s) - 1 for s in args.nan_at.split(",") if s.strip()]
        spec = TrainSpec(model_factory=functools.partial(build_model, config), data_uri=data, step_fn=lm_loss_step,
                         nonfinite_steps=nan_steps)
        # kill steps: one per checkpoint interval, so each restart has a newer checkpoint to resume from
        rng = random.Random(args.seed)
        intervals = rng.sample(range(1, args.steps // args.checkpoint_every), args.kills)
        kills = sorted(i * args.checkpoint_every + rng.randrange(1, args.checkpoint_every) for i in intervals)
        micro = 2

        def engine(name: str, **kw) -> EngineConfig:
            return EngineConfig(run_name=name, storage_path=str(work / "ray"), num_workers=2, micro_batch_size=micro,
                                global_batch_size=micro * args.grad_accum * 2, train_steps=args.steps,
                                zero_stage=args.zero, offload_optimizer=args.offload,
                                optim=OptimConfig(lr=1e-3, warmup_steps=2), checkpoint_every=args.checkpoint_every,
                                log_every=args.steps, max_failures=args.kills, seed=11, check_replicas=True, **kw)

        results = {}
        # rank 1 dies; rank 0 when some attempts run a single worker
        faults = {"fail_at_steps": kills, "fail_rank": 0 if args.resume_workers == 1 else 1,
                  "fail_in_checkpoint": args.kill_in_checkpoint}
        for name, kw in (("uninterrupted", {}), ("faulty", faults)):
            where = " inside checkpoint writes" if args.kill_in_checkpoint else ""
            print(f"{name} run ({args.steps} steps, 2 workers, ZeRO-{args.zero}{' offload' if args.offload else ''}, "
                  f"{args.grad_accum} micro-batches per worker{', NaN at ' + args.nan_at if nan_steps else ''}"
                  f"{f', kills at steps {kills}{where}' if kw else ''}) ...", flush=True)
            cfg = engine(name, **kw)
            t = time.perf_counter()
            if kw and args.resume_workers:
                _run_with_driver_restarts(fit, spec, cfg, args.resume_workers, args.kills)
            else:
                fit(spec, cfg)
            results[name] = {"wall": time.perf_counter() - t, "final": final_steps(cfg), "log": step_log(cfg),
                             "events": events(cfg)}
            print(f"  {results[name]['wall']:.1f}s", flush=True)

        clean, faulty = results["uninterrupted"]["final"], results["faulty"]["final"]
        steps = range(1, args.steps + 1)
        identical = all(clean[s]["loss"] == faulty[s]["loss"] for s in steps)
        rel = [abs(faulty[s]["loss"] - clean[s]["loss"]) / abs(clean[s]["loss"]) for s in steps]
        expected = [i for s in steps for i in clean[s]["indices"]]
        got = [i for s in steps for i in faulty[s]["indices"]]
        lost = len(set(expected) - set(got))
        repeated = len(got) - len(set(got)) - (len(expected) - len(set(expected)))
        faulty_events = results["faulty"]["events"]
        restarts = max(e["attempt"] for e in faulty_events)
        replicas = [e["identical"] for e in faulty_events if e["event"] == "replicas"]
        useful = sum(faulty[s]["seconds"] for s in steps)
        result = {
            "benchmark": "fault_tolerance", "steps": args.steps, "grad_accum": args.grad_accum, "zero": args.zero,
            "offload": args.offload, "kill_in_checkpoint": args.kill_in_checkpoint,
            "resume_workers": args.resume_workers or 2, "kills_at": kills, "restarts": restarts,
            "workers_per_attempt": [e["world"] for e in faulty_events if e["event"] == "start"],
            "losses_identical": identical, "max_loss_rel_diff": max(rel),
            "samples_lost": lost, "samples_repeated": repeated,
            "nonfinite_steps_skipped": sum(faulty[s]["skipped"] for s in steps),
            "replicas_identical": bool(replicas) and all(replicas),
            "checkpoints_rejected": sum(e["event"] == "checkpoint_rejected" for e in faulty_events),
            "goodput": round(useful / results["faulty"]["wall"], 4),
            "goodput_uninterrupted": round(sum(clean[s]["seconds"] for s in steps) / results["uninterrupted"]["wall"], 4),
            "wall_seconds": round(results["faulty"]["wall"], 1),
            "baseline_wall_seconds": round(results["uninterrupted"]["wall"], 1),
            "goal": {"losses_identical": True, "samples_lost": 0, "samples_repeated": 0,
                     "max_loss_rel_diff": 1e-4 if args.resume_workers else 0.0,
                     "nonfinite_steps_skipped": len(nan_steps), "replicas_identical": True,
                     "restarts": f">= {args.kills}"},
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_with_driver_restarts(fit, spec, cfg, resume_workers: int, kills: int) -> None:
    """Each attempt is a separate Ray Train run under the same name (no automatic restarts);
    attempt k uses `resume_workers` workers when k is odd, 2 when even."""
    import dataclasses

    for attempt in range(kills + 1):
        workers = resume_workers if attempt % 2 else 2
        print(f"  attempt {attempt}: {workers} worker(s)", flush=True)
        try:
            fit(spec, dataclasses.replace(cfg, num_workers=workers, max_failures=0))
            return
        except Exception as e:  # the injected kill
            print(f"  attempt {attempt} ended: {type(e).__name__}", flush=True)
    raise RuntimeError(f"the run did not finish in {kills + 1} attempts")


if __name__ == "__main__":
    main()

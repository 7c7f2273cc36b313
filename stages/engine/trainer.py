"""Driver side of the engine: a Ray Train TorchTrainer around `stages.engine.loop.train_loop`."""

from __future__ import annotations

import os

from stages import storage
from stages.cluster import ensure_ray, require_resources
from stages.engine import steplog
from stages.engine.config import EngineConfig
from stages.engine.loop import TrainSpec, run_uri, stopped_reason, train_loop
from stages.engine.runtime import TrainingStopped


def fit(spec: TrainSpec, cfg: EngineConfig):
    """Train with Ray Train workers; rerunning the same run_name and storage_path resumes from
    its newest complete checkpoint (with any number of workers)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(int(cfg.num_workers * cfg.cpus_per_worker) + 2)
    # Ray Train's print patch sends each worker print to its logger *and* (stdout being wrapped by
    # Ray) to stdout: every line reached the console twice. Plain prints; Train propagates this.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    require_resources({"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers if use_gpu else 0},
                      f"training run {cfg.run_name} ({cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU"
                      f"{' + 1 GPU' if use_gpu else ''})")
    cfg.storage_path = storage.absolute(cfg.storage_path)
    spec.data_uri = storage.absolute(spec.data_uri)
    if "://" not in cfg.storage_path:
        os.makedirs(cfg.storage_path, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "engine": cfg},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if reason := stopped_reason(cfg):
        raise TrainingStopped(reason)
    return result


def step_log(cfg: EngineConfig) -> list[dict]:
    """Every step record written by rank 0, all attempts, in order (events left out)."""
    return [r for r in steplog.read(run_uri(cfg)) if "event" not in r]


def events(cfg: EngineConfig) -> list[dict]:
    """The run's events: starts, rejected checkpoints, stops, replica checks."""
    return [r for r in steplog.read(run_uri(cfg)) if "event" in r]


def final_steps(cfg: EngineConfig) -> dict[int, dict]:
    """The last record of each step: after a resume, replayed steps replace the lost ones."""
    return {r["step"]: r for r in step_log(cfg)}

"""Stages placed where their resources are: quantize and the evaluations run as Ray tasks that
request the devices their configs name, not in the driver (on a KubeRay cluster the driver runs
on the head, which has no GPU). `device: auto` is decided here from the cluster's resources."""

from __future__ import annotations

import os
from typing import Any, Callable

from stages.tracking import PARENT_RUN_ENV, active_run_id


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_device(device: str) -> str:
    """`auto` -> cuda when the Ray cluster has GPUs, else cpu; anything else as it is."""
    if device == "auto":
        return "cuda" if cluster_has_gpus() else "cpu"
    return device


def gpus_for(device: str) -> int:
    return 1 if device.startswith("cuda") else 0


def run_quantize(cfg, num_cpus: float) -> None:
    """The quantize stage in a Ray task with one GPU when its device is cuda."""
    cfg.device = resolve_device(cfg.device)
    _remote(_quantize, "quantize", num_cpus=num_cpus, num_gpus=gpus_for(cfg.device))(cfg)


def run_eval(cfg) -> dict[str, Any]:
    """An evaluation in a Ray task. Its tasks run in parallel Ray tasks of their own (one GPU each
    when the device is cuda; eval.parallel auto/ray): then this task only coordinates and needs
    no device. With eval.parallel: local the task itself takes the device."""
    cfg.device = resolve_device(cfg.device)
    if cfg.parallel == "local":
        return _remote(_eval, cfg.run_name, num_cpus=cfg.cpus_per_task, num_gpus=gpus_for(cfg.device))(cfg)
    cfg.parallel = "ray"
    return _remote(_eval, cfg.run_name, num_cpus=0, num_gpus=0)(cfg)


def _quantize(cfg) -> None:
    from stages.quantize.stage import run

    run(cfg)


def _eval(cfg) -> dict[str, Any]:
    from stages.eval.stage import run

    return run(cfg)


def _remote(fn: Callable, name: str, num_cpus: float, num_gpus: int) -> Callable:
    """fn as a Ray task: its MLflow run nested under the driver's active (pipeline) run."""
    import ray

    task = ray.remote(_in_pipeline_run).options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    parent = active_run_id()
    return lambda *args: ray.get(task.remote(fn, parent, *args))


def _in_pipeline_run(fn: Callable, parent_run_id: str, *args):
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = parent_run_id
    try:
        return fn(*args)
    finally:  # a Ray worker process runs other tasks after this one
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before

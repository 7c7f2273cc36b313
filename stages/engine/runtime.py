"""Where the training loop runs: a Ray Train worker, or a plain process (rank and world size
from the environment, as torchrun sets them). The loop is the same code in both."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile

from stages import storage
from stages.engine.config import EngineConfig


class Runtime:
    """The worker's place in the group and how it reports."""

    rank: int
    world: int
    local_rank: int

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        """Called by every rank at every checkpoint (a barrier under Ray Train)."""
        raise NotImplementedError


class RayRuntime(Runtime):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        """Metrics to Ray Train, with (rank 0) a small Ray checkpoint that names the engine
        checkpoint: Ray keeps the metrics of reports with a checkpoint in its result. The
        engine resumes from its own store, not from Ray's registry."""
        import ray.train

        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if checkpoint is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "engine_checkpoint.json"), "w", encoding="utf-8") as f:
                json.dump(checkpoint, f, ensure_ascii=False)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class ProcessRuntime(Runtime):
    def __init__(self, rank: int, world: int, local_rank: int):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.metrics: dict = {}

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        self.metrics = {**metrics, **({"checkpoint": checkpoint["uri"]} if checkpoint else {})}


def fit_in_process(spec, cfg: EngineConfig) -> dict:
    """Run the engine's training loop in this process, without Ray: one process, or one of
    several started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    Same checkpoints, resume and step log as under Ray Train; no automatic restarts (rerun
    to resume). Returns the metrics of the last checkpoint (step, loss, ...)."""
    import torch
    import torch.distributed as dist

    from stages.engine.loop import run_training, stopped_reason

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cfg = dataclasses.replace(cfg, num_workers=world, storage_path=storage.absolute(cfg.storage_path))
    spec = dataclasses.replace(spec, data_uri=storage.absolute(spec.data_uri))
    use_cuda = torch.cuda.is_available() and cfg.use_gpu is not False
    if not dist.is_initialized():
        # what torchrun sets (a lone process gets a free local port); the process group and
        # these stay for later calls in this process: DeepSpeed caches groups derived from the
        # group, reads LOCAL_RANK, and cannot be initialised again on a new group
        defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()) if world == 1 else "29500",
                    "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    runtime = ProcessRuntime(rank, world, local_rank)
    run_training(spec, cfg, runtime)
    if reason := stopped_reason(cfg):
        raise TrainingStopped(reason)
    return runtime.metrics


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. too many consecutive non-finite steps); rerunning repeats it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

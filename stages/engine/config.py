"""Typed config of the training engine (shared by pretraining, SFT, reward modelling, PPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glm.config import ConfigError


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to a floor."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * this (GLM-130B: 10x decay)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 over this many steps (optimizer steps; engine steps, like train_steps,
    for stages that take several optimizer steps per engine step: PPO, GRPO, RLOO)."""
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass
class EngineConfig:
    """How to train: workers, DeepSpeed, schedule, checkpoints, fault tolerance."""

    run_name: str = "glm-pretrain"
    """Ray Train run name: rerunning the same name with the same storage resumes it."""
    storage_path: str = "runs/train"
    """Where the engine keeps checkpoints and its step log (path or URI shared by all workers)."""
    num_workers: int = 2
    """Workers (processes, one device each): tensor_parallel x data-parallel replicas."""
    tensor_parallel: int = 1
    """Tensor-parallel degree: each model replica is split over this many consecutive workers
    (glm/parallel.py: attention heads, FFN columns and the vocabulary sharded), combined with
    ZeRO-1/2 over the num_workers / tensor_parallel replicas. The model's heads, FFN width and
    vocabulary must divide by it; plain GLM models only (no P-Tuning v2 prefixes, LoRA or value
    heads). Checkpoints record it and resume at another degree (docs/training.md)."""
    use_gpu: bool | None = None
    """None = use GPUs when CUDA is available."""
    cpus_per_worker: float = 1.0
    micro_batch_size: int = 4
    """Rows per model replica per forward pass (the tensor-parallel ranks of a replica all get them)."""
    grad_accum_steps: int = 1
    """Micro-batches per replica per optimizer step (when global_batch_size is 0)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all workers; 0 = micro_batch_size x grad_accum_steps x
    data-parallel replicas (num_workers / tensor_parallel). When set, the accumulation is derived
    from the workers actually running, so a run checkpointed with N workers resumes with M at the
    same global batch (it must be a multiple of micro_batch_size x replicas)."""
    batch_warmup_steps: int = 0
    """Ramp the global batch linearly from batch_warmup_start sequences to the full global batch
    over this many steps, through gradient accumulation (the micro-batch keeps its size; the
    batch is rounded down to a multiple of micro_batch_size x workers, at least one micro-batch
    per worker). GLM-130B: 192 -> 4224 sequences over 2.5% of samples. 0 = off."""
    batch_warmup_start: int = 1
    """Global batch (sequences) at step 0 of the batch-size warm-up."""
    train_steps: int = 100
    """Optimizer steps in the whole run."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    """ZeRO CPU offload of the optimizer state."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp16 uses dynamic loss scaling; use fp32 or bf16 on CPU."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Complete engine checkpoints kept (older ones are deleted once a newer one is complete)."""
    resume_from: str = ""
    """A run directory (<storage>/<run>) or one checkpoint directory of another run, path or URI:
    its newest complete checkpoint is loaded when this run has none of its own (continuing a
    run under a changed config on purpose). "" = start fresh when this run has no checkpoint."""
    max_failures: int = 3
    """Worker-group restarts after a crash before the run fails."""
    validate_every: int = 0
    """Validation loss every this many steps (0 = only at the end)."""
    validation_batches: int = 4
    validate_at_start: bool = False
    """Also measure the validation loss before the first step (step 0; fine-tuning baselines)."""
    log_every: int = 10
    max_consecutive_skips: int = 10
    """Stop the run with an error after this many consecutive optimizer steps skipped for
    non-finite losses or gradients (0 = never stop)."""
    cpu_adam: bool = False
    """With offload_optimizer: DeepSpeed's compiled CPU Adam (built once per machine with its C++
    toolchain, cached in ~/.cache/torch_extensions) instead of torch's AdamW stepping the
    offloaded state. 6.7x faster per optimizer step (benchmarks/offload_optimizer.py), but a
    resume is not bitwise exact with it (it keeps its bias corrections as running products:
    losses after a restart differ by about 1e-7 relative), so it is opt-in."""
    check_replicas: bool = False
    """At the end, hash every rank's full parameters and report whether the replicas are identical."""
    skip_data_ranges: list[list[int]] = field(default_factory=list)
    """[start, end) ranges of data indices never trained on (GLM-130B's skip-train-iteration-range)."""
    grad_spike_factor: float = 5.0
    """Warn when the gradient norm exceeds this times its running mean."""
    peak_flops_per_worker: float = 0.0
    """Peak FLOP/s of one worker's device for MFU (989e12: H100 bf16 dense); 0 = not reported."""
    seed: int = 1234
    fail_at_steps: list[int] = field(default_factory=list)
    """Testing: in attempt k, rank `fail_rank` exits (os._exit(1)) when it reaches step
    fail_at_steps[k]; put a checkpoint between consecutive failure steps."""
    fail_rank: int = 1
    fail_in_checkpoint: bool = False
    """Testing: the injected failure happens inside the checkpoint write of the first checkpoint
    at or after fail_at_steps[k] (after this rank's shard is written, before the checkpoint is
    complete) instead of at the start of the step."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.micro_batch_size < 1 or self.grad_accum_steps < 1 or self.train_steps < 1:
            raise ConfigError("num_workers, micro_batch_size, grad_accum_steps and train_steps must be >= 1")
        if self.tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.num_workers % self.tensor_parallel:
            raise ConfigError(f"num_workers {self.num_workers} is not a multiple of tensor_parallel "
                              f"{self.tensor_parallel}: workers = tensor_parallel x data-parallel replicas")
        if self.tensor_parallel > 1 and self.zero_stage not in (1, 2):
            raise ConfigError(f"tensor_parallel {self.tensor_parallel} needs zero_stage 1 or 2 (ZeRO over the "
                              f"data-parallel replicas), got zero_stage {self.zero_stage}")
        if self.global_batch_size:
            self.check_world(self.data_parallel)
        if self.batch_warmup_steps < 0 or self.batch_warmup_start < 1:
            raise ConfigError("batch_warmup_steps must be >= 0 and batch_warmup_start >= 1")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be >= 1")
        for r in self.skip_data_ranges:
            if len(r) != 2 or r[0] >= r[1]:
                raise ConfigError(f"skip_data_ranges: {r} is not a [start, end) range")

    @property
    def data_parallel(self) -> int:
        """Model replicas (data-parallel ranks) among num_workers."""
        return self.num_workers // self.tensor_parallel

    def check_world(self, world: int) -> None:
        """`world`: data-parallel ranks (the workers when tensor_parallel is 1)."""
        if self.full_global_batch(world) % (self.micro_batch_size * world):
            raise ConfigError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size} x {world} data-parallel workers")

    def full_global_batch(self, world: int) -> int:
        """Sequences per optimizer step after the warm-up."""
        return self.global_batch_size or self.micro_batch_size * self.grad_accum_steps * world

    def global_batch_at(self, step: int, world: int | None = None) -> int:
        """Sequences of all workers in one optimizer step (the batch-size warm-up included)."""
        world = world or self.data_parallel
        full, unit = self.full_global_batch(world), self.micro_batch_size * world
        if step < self.batch_warmup_steps:
            start = min(self.batch_warmup_start, full)
            full = start + (full - start) * step // self.batch_warmup_steps
        return max(unit, full // unit * unit)

    def micro_batches_at(self, step: int, world: int | None = None) -> int:
        """Micro-batches each worker accumulates in one optimizer step."""
        world = world or self.data_parallel
        return self.global_batch_at(step, world) // (self.micro_batch_size * world)

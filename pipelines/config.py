"""The pipeline's own config: which stages run, their sections, where outputs go, tracking,
registry and the endpoint check. Each stage section is validated against its stage's typed
config by `pipelines.wiring.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glm.config import ConfigError
from stages.tracking import TrackingConfig

ORDER = ("data", "pretrain", "sft", "rlhf", "quantize", "serve")
"""Every stage the pipeline knows, in pipeline order."""
MODEL_STAGES = ("pretrain", "sft", "rlhf", "quantize")
"""Stages that make a model (what `eval_after` may name)."""


@dataclass
class RegistryConfig:
    """MLflow Model Registry entry for the pipeline's final model."""

    name: str = "glm-chat"
    """Registered model name ("" = do not register)."""
    alias: str = "newest"
    """Alias moved to each new version."""
    copy_weights: bool = True
    """Log the checkpoint's files as the MLflow Model's artifacts (a registry entry usable on any
    machine that reaches the tracking server). False: register the checkpoint's URI by reference
    (no copy: for very large models whose checkpoint already lives in shared storage)."""


@dataclass
class CheckConfig:
    """Requests sent to the deployed endpoint at the end of the pipeline."""

    chat: str = "你好"
    fill: str = "话说天下大势，[MASK]"
    max_tokens: int = 24
    require_sensible: bool = True
    """Fail the pipeline when an answer is empty, one token repeated or not in its prompt's
    language (pipelines/effects.py); off only for untrained test models."""


@dataclass
class ResourcesConfig:
    """Ray resources of what the driver runs as Ray tasks: quantize and the evaluations (GPUs
    follow each one's `device`; an evaluation's CPUs are `eval.cpus_per_task`)."""

    quantize_cpus: float = 2.0
    """Logical CPUs of the quantize task (Ray sets its torch threads to this)."""


@dataclass
class PipelineConfig:
    """A pipeline run: which stages, their configs, where outputs go, how it is tracked."""

    name: str = "glm"
    """Pipeline name: stage run names and checkpoints derive from it, so rerunning the same
    name skips finished stages and resumes an interrupted one (`--run-name` / GLM_RUN_NAME override it)."""
    work_dir: str = "runs/{name}"
    """Root path or URI of every stage output not set explicitly; `{name}` is replaced by the
    pipeline name, so runs of one config under different names keep separate outputs."""
    stages: list[str] = field(default_factory=lambda: ["data", "pretrain", "sft"])
    """Stages to run, in pipeline order (data, pretrain, sft, rlhf, quantize, serve)."""
    data: dict[str, Any] = field(default_factory=dict)
    """stages.data DataConfig fields (output defaults to <work_dir>/data)."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """stages.pretrain PretrainConfig fields (data, output, engine run name and storage are filled in)."""
    sft: dict[str, Any] = field(default_factory=dict)
    """stages.sft SFTConfig fields (base, output, engine run name and storage are filled in)."""
    rlhf: dict[str, Any] = field(default_factory=dict)
    """`reward` and `policy`: stages.rlhf RLHFConfig fields of the reward model (optional) and of
    the PPO or DPO policy (bases, outputs, reward model, run names are filled in)."""
    quantize: dict[str, Any] = field(default_factory=dict)
    """stages.quantize QuantizeConfig fields (checkpoint = the last training stage's model)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """stages.eval EvalConfig fields (tasks, max_items, batch_size ...) for every evaluation."""
    eval_after: list[str] = field(default_factory=lambda: ["pretrain", "sft", "rlhf", "quantize"])
    """Evaluate the model of each of these stages (when it runs in this pipeline) right after it."""
    serve: dict[str, Any] = field(default_factory=dict)
    """stages.serve ServeConfig fields (checkpoint = the pipeline's final model; host 0.0.0.0 on a cluster)."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=True))
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ORDER]
        if unknown:
            raise ConfigError(f"pipeline stages {unknown} are not available; choose from {list(ORDER)}")
        order = [s for s in ORDER if s in self.stages]
        if order != self.stages:
            raise ConfigError(f"pipeline stages must be in pipeline order {order}, got {self.stages}")
        unknown = [s for s in self.eval_after if s not in MODEL_STAGES]
        if unknown:
            raise ConfigError(f"eval_after: {unknown} produce no model to evaluate; choose from {', '.join(MODEL_STAGES)}")

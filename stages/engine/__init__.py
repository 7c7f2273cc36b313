"""The training engine: Ray Train workers x DeepSpeed, engine-owned data position, checkpoints,
failure restarts with exact resume, metrics. Stages plug in a TrainSpec (model factory, data,
step function) and never write their own loop."""

from stages.engine.config import EngineConfig, OptimConfig
from stages.engine.loop import TrainSpec, lm_loss_step

__all__ = ["EngineConfig", "OptimConfig", "TrainSpec", "fit", "fit_in_process", "lm_loss_step"]


def fit(spec: TrainSpec, cfg: EngineConfig):
    from stages.engine.trainer import fit as _fit

    return _fit(spec, cfg)


def fit_in_process(spec: TrainSpec, cfg: EngineConfig) -> dict:
    """The same loop in this process without Ray (torchrun-style env for several ranks)."""
    from stages.engine.runtime import fit_in_process as _fit_in_process

    return _fit_in_process(spec, cfg)

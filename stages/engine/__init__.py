"""The training engine: Ray Train workers x DeepSpeed, engine-owned data position, checkpoints,
failure restarts with exact resume, metrics. Stages plug in a TrainSpec (model factory, data,
step function) and never write their own loop."""

from stages.engine.config import EngineConfig, OptimConfig
from stages.engine.loop import TrainSpec, lm_loss_step

__all__ = ["EngineConfig", "OptimConfig", "TrainSpec", "fit", "lm_loss_step"]


def fit(spec: TrainSpec, cfg: EngineConfig):
    from stages.engine.trainer import fit as _fit

    return _fit(spec, cfg)

"""Typed config of the pretraining stage (`python -m stages.pretrain --config FILE`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm.config import ModelSpec
from stages.engine.config import EngineConfig
from stages.tracking import TrackingConfig


@dataclass
class PretrainConfig:
    """GLM pretraining on a data-stage output with the training engine."""

    output: str
    """Where the inference checkpoint (safetensors + config + tokenizer) is written."""
    data: str = ""
    """The data stage's output (path or URI); a pipeline fills it in."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Preset and overrides; vocab size and position encoding come from the data."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

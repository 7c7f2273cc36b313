"""The GLM model library: configs, the transformer, tokenizer, sample schema, generation and
the inference checkpoint format. Plain PyTorch; never imports Ray."""

from glm.config import GLMConfig, ModelSpec, preset
from glm.model import GLMModel, GLMOutput, count_parameters

__all__ = ["GLMConfig", "GLMModel", "GLMOutput", "ModelSpec", "count_parameters", "preset"]

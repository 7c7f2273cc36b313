"""The GLM model library: configs, the transformer, tokenizer, sample schema, generation and
the inference checkpoint format. Plain PyTorch; never imports Ray.

Submodules import torch only where they need it (`glm.schema`, `glm.tokenizer` and
`glm.config` do not), so data workers can use the layouts and the tokenizer without it.
"""

from glm.config import GLMConfig, ModelSpec, preset

__all__ = ["GLMConfig", "GLMModel", "GLMOutput", "ModelSpec", "count_parameters", "preset"]


def __getattr__(name: str):
    if name in ("GLMModel", "GLMOutput", "count_parameters"):
        from glm import model

        return getattr(model, name)
    raise AttributeError(f"module 'glm' has no attribute {name!r}")

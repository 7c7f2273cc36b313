"""A tiny GLM (random weights, fixed seed) and its inference checkpoint for the eval tests.

A plain module, not a conftest.py: a second `conftest` module would shadow the root one for
tests that import from it.
"""

import torch

from glm.config import padded_vocab_size, preset
from glm.model import GLMModel


def tiny_model(tokenizer, **overrides) -> GLMModel:
    """The seeded tiny preset sized for `tokenizer`, in eval mode (GLMConfig overrides allowed)."""
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), **overrides)).eval()


def write_tiny_checkpoint(tokenizer, path) -> str:
    """The tiny model as an inference checkpoint at `path`."""
    from glm.checkpoint import save_inference_checkpoint

    save_inference_checkpoint(tiny_model(tokenizer), tokenizer, path, metadata={"stage": "test"})
    return str(path)

"""A tiny GLM (random weights, fixed seed) and its inference checkpoint for the eval tests."""

import pytest
import torch

from glm.config import padded_vocab_size, preset
from glm.model import GLMModel


def _tiny_model(tokenizer, **overrides) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), **overrides)).eval()


@pytest.fixture
def tiny_model(tokenizer):
    """Build the seeded tiny GLM for the session tokenizer: tiny_model(**GLMConfig overrides)."""
    return lambda **overrides: _tiny_model(tokenizer, **overrides)


@pytest.fixture(scope="session")
def eval_checkpoint(tokenizer, tmp_path_factory):
    """An inference checkpoint of the tiny model, written once per session."""
    from glm.checkpoint import save_inference_checkpoint

    path = tmp_path_factory.mktemp("eval") / "model"
    save_inference_checkpoint(_tiny_model(tokenizer), tokenizer, path, metadata={"stage": "test"})
    return str(path)

"""Presets, strict config loading, and parameter counts without allocating."""

from dataclasses import dataclass, field

import pytest

from glm.config import ConfigError, GLMConfig, ModelSpec, PRESETS, from_dict, preset
from glm.model import count_parameters


def test_every_preset_builds():
    for name in PRESETS:
        assert preset(name).head_dim * preset(name).num_heads == preset(name).hidden_size


def test_tiny_is_under_a_million_and_small_a_few_million():
    assert count_parameters(preset("tiny")).total < 1_000_000
    assert 1_000_000 < count_parameters(preset("small")).total < 20_000_000


def test_chatglm_6b_shape_and_count():
    c = preset("chatglm_6b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size, c.vocab_size) == (28, 4096, 32, 16384, 130528)
    assert c.ffn_type == "gelu" and c.uses_2d_positions and not c.tie_word_embeddings
    n = count_parameters(c)
    # GLM's "6.2B" counts the output projection once (as the embedding); the separate
    # lm_head adds another vocab x hidden on top of that.
    assert abs(n.reported - 6.2e9) / 6.2e9 < 0.01
    assert n.output_head == 130528 * 4096


def test_glm_130b_shape_and_count():
    c = preset("glm_130b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size, c.vocab_size) == (70, 12288, 96, 32768, 150528)
    assert c.ffn_type == "geglu" and not c.uses_2d_positions and c.tie_word_embeddings
    n = count_parameters(c)
    h, L, V, inner = 12288, 70, 150528, 32768
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * 2 * inner + 2 * inner) + (inner * h + h) + 4 * h
    assert n.total == L * per_layer + V * h + 2 * h  # exact: 128,697,794,560
    # "130B" is the rounded name: the exact count is 1.002% below it, so the bound here is
    # 1.5% (the issue asked for 1%; see docs/model.md).
    assert abs(n.reported - 130e9) / 130e9 < 0.015


def test_preset_overrides_and_unknown_override():
    assert preset("tiny", num_layers=3).num_layers == 3
    with pytest.raises(ConfigError, match="nonsense"):
        preset("tiny", nonsense=1)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        preset("huge")


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="num_heads"):
        GLMConfig(vocab_size=10, hidden_size=30, num_layers=1, num_heads=4)
    with pytest.raises(ConfigError, match="embedding_grad_shrink"):
        preset("tiny", embedding_grad_shrink=0.0)


@dataclass
class _Inner:
    lr: float = 1e-3
    """Learning rate."""


@dataclass
class _Outer:
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    train: _Inner = field(default_factory=_Inner)


def test_from_dict_nested_and_unknown_keys_named():
    cfg = from_dict(_Outer, {"name": "x", "train": {"lr": 1}, "model": {"preset": "tiny"}})
    assert cfg.train.lr == 1.0 and cfg.model.build().hidden_size == 64
    with pytest.raises(ConfigError, match=r"f\.yaml\.train: unknown key\(s\) 'lrr'"):
        from_dict(_Outer, {"name": "x", "train": {"lrr": 1}}, where="f.yaml")
    with pytest.raises(ConfigError, match="missing required key"):
        from_dict(_Outer, {})
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        from_dict(_Outer, {"name": "x", "train": {"lr": "fast"}})

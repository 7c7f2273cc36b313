"""Presets, strict config loading, and parameter counts without allocating."""

import re
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


# --- --set overrides ----------------------------------------------------------------------

def test_override_values_read_as_yaml():
    from glm.config import parse_override

    assert parse_override("pretrain.engine.optim.lr=1e-3") == (["pretrain", "engine", "optim", "lr"], 0.001)
    assert parse_override("stages=[data, pretrain]") == (["stages"], ["data", "pretrain"])
    assert parse_override("data.sources[0].uri=s3://b/x=y.jsonl") == (["data", "sources", 0, "uri"], "s3://b/x=y.jsonl")
    assert parse_override("m={a: 1, b: [2]}")[1] == {"a": 1, "b": [2]}
    assert [parse_override(f"k={v}")[1] for v in ("true", "12", "-2E-3", "null", "'01'", "", "Q: why?", "你好")] == \
        [True, 12, -0.002, None, "01", "", "Q: why?", "你好"]
    for bad, message in (("lr", "expected path.to.key=value"), ("=1", "expected path.to.key=value"),
                         ("a..b=1", "'' in 'a..b' is not a key"), ("a=[1", "not valid YAML")):
        with pytest.raises(ConfigError, match=message):
            parse_override(bad)


def test_yaml_files_read_exponents_without_a_dot_as_floats(tmp_path):
    from glm.config import load_yaml

    (tmp_path / "c.yaml").write_text("name: x\ntrain: {lr: 3e-4}\n")
    assert load_yaml(_Outer, tmp_path / "c.yaml").train.lr == 3e-4


def test_overrides_set_nested_keys_creating_mappings_and_leave_the_data_alone():
    from glm.config import apply_overrides

    data = {"name": "x", "sources": [{"uri": "a"}, {"uri": "b"}]}
    out = apply_overrides(data, ["train.lr=2", "sources[1].uri=c", "name=y", "name=z"])
    assert out == {"name": "z", "sources": [{"uri": "a"}, {"uri": "c"}], "train": {"lr": 2}}
    assert data == {"name": "x", "sources": [{"uri": "a"}, {"uri": "b"}]}
    for bad, message in (("sources[2].uri=c", r"sources has 2 item\(s\), no \[2\]"),
                         ("sources.uri=c", "sources is a list, not a mapping with key 'uri'"),
                         ("name.first=c", "name is a str, not a mapping"),
                         ("other[0]=c", r"other is not in the config, so it has no item \[0\]: set the whole list")):
        with pytest.raises(ConfigError, match=rf"--set {re.escape(bad)}: {message}"):
            apply_overrides(data, [bad])


def test_an_override_error_names_the_key_and_the_set_it_came_from(tmp_path):
    from glm.config import load_yaml

    (tmp_path / "f.yaml").write_text("name: x\ntrain: {lr: 0.1}\n")
    assert load_yaml(_Outer, tmp_path / "f.yaml", ["train.lr=1e-3", "model.preset=tiny"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match=r"^--set train\.lrr=1: .*f\.yaml\.train: unknown key\(s\) 'lrr'"):
        load_yaml(_Outer, tmp_path / "f.yaml", ["name=y", "train.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set train\.lr=fast: .*train\.lr: expected float, got str 'fast'"):
        load_yaml(_Outer, tmp_path / "f.yaml", ["train.lr=fast", "name=y"])
    with pytest.raises(ConfigError, match=r"^--set train=3: .*train: expected a mapping"):
        load_yaml(_Outer, tmp_path / "f.yaml", ["train=3"])
    (tmp_path / "f.yaml").write_text("name: x\ntrain: {lrr: 0.1}\n")  # the file's own error stays the file's
    with pytest.raises(ConfigError, match=r"^\S*f\.yaml\.train: unknown key\(s\) 'lrr'"):
        load_yaml(_Outer, tmp_path / "f.yaml", ["name=y"])

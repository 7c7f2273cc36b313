"""Typed configuration for the GLM model, its named presets, and strict YAML loading.

Every config in the project is a dataclass; `from_dict` builds one from plain data
(YAML, JSON) and fails on an unknown key with a message naming it and where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not match its dataclass (unknown key, wrong type, bad value)."""


@dataclass
class GLMConfig:
    """Shape and behaviour of a GLM transformer (GLM-130B / ChatGLM family)."""

    vocab_size: int
    """Rows of the embedding table (the tokenizer's size padded up, see `padded_vocab_size`)."""
    hidden_size: int
    """Model width h."""
    num_layers: int
    """Number of transformer blocks N (also sets the DeepNorm constants)."""
    num_heads: int
    """Attention heads; head dim is hidden_size / num_heads."""
    ffn_hidden_size: int | None = None
    """FFN inner width; default 4h for GELU and 8h/3 (rounded up to 64) for GeGLU."""
    ffn_type: Literal["gelu", "geglu"] = "gelu"
    """GELU FFN (ChatGLM-6B) or gated GeGLU (GLM-130B)."""
    position_encoding: Literal["rope_1d", "rope_2d"] = "rope_2d"
    """1D RoPE over position_ids (GLM-130B) or 2D RoPE: half of each head rotated by
    position_ids, the other half by block_position_ids (GLM-10B, ChatGLM-6B)."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    rope_fp16_frequencies: bool = False
    """Round the RoPE inverse frequencies to fp16 before use, as ChatGLM-6B's published code does
    (its RotaryEmbedding keeps them in half precision); the rotation angles are still computed in
    fp32. Set by the ChatGLM-6B import (`glm.chatglm_hf`) so its weights give the published
    model's logits: the rounding moves the angles by up to 4e-4 relative (0.3 rad at position 2000
    for ChatGLM-6B's head dim 128)."""
    max_seq_len: int = 2048
    """Longest sequence the model is trained or asked to generate for."""
    tie_word_embeddings: bool = False
    """Output projection shares the input embedding (GLM-130B) or is a separate lm_head."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    residual: Literal["deepnorm", "pre_ln"] = "deepnorm"
    """How each block adds its sub-layers: `deepnorm` (GLM-130B / ChatGLM-6B: y = LN(x),
    x' = y * alpha + f(y)) or `pre_ln` (x' = x + f(LN(x)); measured against DeepNorm in
    benchmarks/learning.py, docs/benchmarks.md)."""
    hidden_dropout: float = 0.0
    """Dropout on the embedding and on each sub-layer's output."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    embedding_grad_shrink: float = 0.1
    """EGS alpha: the embedding's gradient is scaled by this; 1.0 turns it off."""
    attention_softmax_fp32_scaling: bool = True
    """Compute scores on q / (sqrt(d) * (layer+1)) in the input dtype, then softmax in fp32
    after multiplying back (GLM-130B's overflow guard for fp16)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass to save activation memory."""
    init_std: float = 0.02
    """Std of the normal init of the embedding (and a separate lm_head)."""
    pre_seq_len: int = 0
    """P-Tuning v2: number of trainable key/value prefix positions in every layer (0 = none)."""
    prefix_projection: bool = False
    """P-Tuning v2 reparameterisation: prefixes come from an embedding through a 2-layer MLP
    (training only; an export folds the MLP into a plain prefix table)."""
    prefix_hidden_size: int = 0
    """Width of that MLP's hidden layer (0 = hidden_size)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"GLMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"GLMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        rotary_dims = 4 if self.position_encoding == "rope_2d" else 2
        if self.head_dim % rotary_dims:
            raise ConfigError(
                f"GLMConfig head dim {self.head_dim} must be divisible by {rotary_dims} "
                f"for {self.position_encoding}"
            )
        if self.residual not in ("deepnorm", "pre_ln"):
            raise ConfigError(f"GLMConfig.residual must be 'deepnorm' or 'pre_ln', got {self.residual!r}")
        if self.ffn_type not in ("gelu", "geglu"):
            raise ConfigError(f"GLMConfig.ffn_type must be 'gelu' or 'geglu', got {self.ffn_type!r}")
        if self.position_encoding not in ("rope_1d", "rope_2d"):
            raise ConfigError(
                f"GLMConfig.position_encoding must be 'rope_1d' or 'rope_2d', "
                f"got {self.position_encoding!r}"
            )
        if not 0.0 < self.embedding_grad_shrink <= 1.0:
            raise ConfigError(
                f"GLMConfig.embedding_grad_shrink must be in (0, 1], got {self.embedding_grad_shrink}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"GLMConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pre_seq_len < 0 or self.prefix_hidden_size < 0:
            raise ConfigError(f"GLMConfig.pre_seq_len ({self.pre_seq_len}) and prefix_hidden_size "
                              f"({self.prefix_hidden_size}) must be >= 0")
        if self.ffn_hidden_size is None:
            if self.ffn_type == "gelu":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def uses_2d_positions(self) -> bool:
        return self.position_encoding == "rope_2d"

    @property
    def deepnorm_alpha(self) -> float:
        """Residual scale of DeepNorm, (2N)^0.5."""
        return (2.0 * self.num_layers) ** 0.5

    @property
    def deepnorm_beta(self) -> float:
        """Init gain of value, attention output and FFN weights, (2N)^-0.5."""
        return (2.0 * self.num_layers) ** -0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> "GLMConfig":
        return from_dict(cls, data, where)


def padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    """Round a tokenizer size up to a multiple (GLM-130B pads 150000 to 150528 = 196 x 768)."""
    return multiple * math.ceil(n_tokens / multiple)


# --- presets ------------------------------------------------------------------------------
# Each is a small function so a preset reads as a sentence; `preset(name, **overrides)` builds
# one with fields replaced (e.g. the vocab size of a freshly trained tokenizer).


def _tiny() -> GLMConfig:
    """Unit tests: well under 1M parameters, 2D RoPE and a separate head like ChatGLM."""
    return GLMConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=256)


def _small() -> GLMConfig:
    """CPU smoke runs: a few million parameters, trains in minutes on 2 cores.

    Embedding gradient shrink is off (1.0): it is GLM-130B's guard against fp16 loss spikes
    at 100B scale, and here, where the embedding is most of the model, it slowed learning
    several-fold (docs/benchmarks.md, "Does the recipe learn?"). The large presets keep 0.1.

    Pre-LN residuals instead of DeepNorm: at 4 layers DeepNorm's post-LN (each block's output
    normalised, no residual stream) learned several times slower on the same budget (held-out
    0.43x unigram on English with pre-LN against 0.77x with DeepNorm after 112 steps;
    docs/benchmarks.md). DeepNorm is GLM-130B's guard for 70 layers in fp16; the large presets
    keep it."""
    return GLMConfig(
        vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, max_seq_len=512,
        tie_word_embeddings=True, embedding_grad_shrink=1.0, residual="pre_ln",
    )


def _glm_350m() -> GLMConfig:
    return GLMConfig(
        vocab_size=50048, hidden_size=1024, num_layers=24, num_heads=16, ffn_type="geglu",
        position_encoding="rope_1d", tie_word_embeddings=True,
    )


def _glm_1b() -> GLMConfig:
    return GLMConfig(
        vocab_size=50048, hidden_size=2048, num_layers=20, num_heads=16, ffn_type="geglu",
        position_encoding="rope_1d", tie_word_embeddings=True,
    )


def _chatglm_6b() -> GLMConfig:
    """ChatGLM-6B: 28 x 4096, 32 heads, GELU 4h FFN, 2D RoPE, separate lm_head."""
    return GLMConfig(
        vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32, ffn_type="gelu",
        ffn_hidden_size=16384, position_encoding="rope_2d", tie_word_embeddings=False,
    )


def _glm_130b() -> GLMConfig:
    """GLM-130B: 70 x 12288, 96 heads, GeGLU inner 32768, 1D RoPE, tied output."""
    return GLMConfig(
        vocab_size=150528, hidden_size=12288, num_layers=70, num_heads=96, ffn_type="geglu",
        ffn_hidden_size=32768, position_encoding="rope_1d", tie_word_embeddings=True,
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "glm_350m": _glm_350m,
    "glm_1b": _glm_1b,
    "chatglm_6b": _chatglm_6b,
    "glm_130b": _glm_130b,
}


def preset(name: str, **overrides: Any) -> GLMConfig:
    """A named preset, with fields replaced by `overrides` (validated again)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[name]().to_dict()
    unknown = set(overrides) - set(base)
    if unknown:
        raise ConfigError(f"unknown GLMConfig field(s) in overrides of preset {name!r}: {sorted(unknown)}")
    if "ffn_type" in overrides and "ffn_hidden_size" not in overrides:
        base["ffn_hidden_size"] = None  # let the new FFN type pick its default width
    base.update(overrides)
    return GLMConfig(**base)


@dataclass
class ModelSpec:
    """How a stage config names a model: a preset plus field overrides."""

    preset: str = "small"
    """One of glm.config.PRESETS."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """GLMConfig fields to replace, e.g. {num_layers: 2, hidden_dropout: 0.1}."""

    def build(self, **extra: Any) -> GLMConfig:
        return preset(self.preset, **{**self.overrides, **extra})


# --- strict dataclass loading ------------------------------------------------------------


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields.

    Unknown keys, missing required keys and values of the wrong type raise ConfigError
    naming the key path (e.g. "smoke.yaml: train.lr").
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


# --- YAML files and command-line overrides ---------------------------------------------------

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


@functools.lru_cache(maxsize=None)
def _yaml_loader():
    """PyYAML's safe loader, which also reads `1e-3` as a float (YAML 1.2; PyYAML's YAML 1.1
    rules want a dot, `1.0e-3`, and would read `1e-3` as a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789."))
    return Loader


def read_yaml(path: str | Path) -> Any:
    """The plain data of a YAML file ({} when empty), errors naming the file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_yaml_loader()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None


_KEY_PART = re.compile(r"([^.\[\]=]+)((?:\[[0-9]+\])*)")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`path.to.key=value` (a `--set` flag) -> (key path, value).

    `a.b[0].c` steps into item 0 of the list `a.b`. The value is read as YAML, so
    `1e-3` is a float, `true` a bool, `[data, pretrain]` a list and `{lr: 1}` a mapping; `null`
    is None and an empty value the empty string. A value that reads as a block mapping or list
    (`Q: why?`, `- x`) stays a string: only `{...}` and `[...]` make collections.
    """
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected path.to.key=value")
    path: list[str | int] = []
    for part in key.split("."):
        m = _KEY_PART.fullmatch(part.strip())
        if not m:
            raise ConfigError(f"--set {text}: {part!r} in {key!r} is not a key (name, or name[index])")
        path.append(m.group(1))
        path += [int(i) for i in re.findall(r"[0-9]+", m.group(2))]
    if not raw.strip():
        return path, ""
    try:
        value = yaml.load(raw, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: the value is not valid YAML: {e}") from None
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        value = raw
    return path, value


def key_name(path: Sequence[str | int]) -> str:
    """A key path as written in `--set`: a.b[0].c."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def apply_overrides(data: Any, overrides: Sequence[str]) -> Any:
    """A copy of the plain config data with each `path.to.key=value` set, in order: as if the
    YAML file said so. Mappings on the way are created when missing; a list item must exist (a
    list the file does not have is set whole, `--set a.items=[...]`). The typed loader then
    checks the result like any file, so unknown keys and wrong types fail there."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"--set: the config is a {type(data).__name__}, not a mapping of keys")
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, key in enumerate(path):
            at = key_name(path[:i])
            if isinstance(key, int):
                if not isinstance(node, list):
                    raise ConfigError(f"--set {text}: {at} is not a list, it has no item [{key}]")
                if key >= len(node):
                    raise ConfigError(f"--set {text}: {at} has {len(node)} item(s), no [{key}]")
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {at} is a {type(node).__name__}, not a mapping with key {key!r}")
            if i == len(path) - 1:
                node[key] = value
                break
            if isinstance(key, str) and node.get(key) is None:
                if isinstance(path[i + 1], int):
                    raise ConfigError(f"--set {text}: {key_name(path[:i + 1])} is not in the config, so it has "
                                      f"no item [{path[i + 1]}]: set the whole list, --set {key_name(path[:i + 1])}=[...]")
                node[key] = {}
            node = node[key]
    return data


def build_with_overrides(build: Callable[[Any], T], data: Any, overrides: Sequence[str]) -> T:
    """`build(data with overrides applied)`. A ConfigError the overrides caused (the data alone
    does not fail so) names the first `--set` after which it occurs."""
    try:
        return build(apply_overrides(data, overrides))
    except ConfigError as e:
        if not overrides:
            raise
        error = str(e)

    def fails_so(n: int) -> bool:
        try:
            build(apply_overrides(data, overrides[:n]))
        except Exception as e:  # noqa: BLE001 - any other failure of a prefix is not this error
            return isinstance(e, ConfigError) and str(e) == error
        return False

    if fails_so(0):
        raise ConfigError(error)
    culprit = next((text for n, text in enumerate(overrides, 1) if fails_so(n)), None)
    if culprit is None:
        raise ConfigError(f"{error} (with {' '.join(f'--set {o}' for o in overrides)})")
    raise ConfigError(f"--set {culprit}: {error}")


def load_yaml(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Load a YAML file into dataclass `cls`, with `--set` overrides applied to its data before
    the strict loader checks it; errors name the file and key (and the `--set` they came from)."""
    return build_with_overrides(lambda data: from_dict(cls, data, where=str(path)), read_yaml(path), overrides)

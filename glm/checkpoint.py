"""The inference checkpoint: a directory that quantize, eval and serve load.

    <dir>/model.safetensors   weights (no pickle); a tied lm_head is stored once
    <dir>/config.json         {"format": ..., "model": GLMConfig fields, "metadata": {...},
                               "quantization": {"bits", "group_size", "scheme"} (quantized only)}
    <dir>/tokenizer.model     the SentencePiece model

`dir` may be a local path or a URI (s3://, gs://, ...): remote directories are written to a
local temporary directory and copied with pyarrow's file systems (imported only then). A
checkpoint is replaced without a moment where none exists (`glm.checkpoint_dir`: locally `dir`
is a link to a versioned sibling directory).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from glm.checkpoint_dir import current, local_path, publish
from glm.config import GLMConfig
from glm.filesystems import from_uri, is_remote
from glm.model import GLMModel
from glm.int_quant import QuantSpec, cast_model, model_quantization, prepare_quantized
from glm.tokenizer import GLMTokenizer

FORMAT = "glm-inference-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, GLMTokenizer.MODEL_FILE)
"""What a complete checkpoint holds."""


def _is_remote(uri: str) -> bool:
    return is_remote(uri)


def _local_path(uri: str) -> Path:
    return local_path(uri)


def save_inference_checkpoint(
    model: GLMModel, tokenizer: GLMTokenizer, uri: str | Path, metadata: dict[str, Any] | None = None
) -> str:
    """Write model weights, config and tokenizer to `uri` (created or replaced); returns `uri`.

    Written to a temporary sibling first and renamed into place, so a crash never leaves a
    half-written checkpoint under the final name. A model with `QuantizedLinear` layers is
    written as a quantized checkpoint (its spec under `quantization` in config.json).
    """
    from safetensors.torch import save_model

    def fill(staging: Path) -> None:
        save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        _write_config(staging, model.config, metadata, model_quantization(model))
        tokenizer.save(staging / GLMTokenizer.MODEL_FILE)

    return _write_dir(str(uri), fill)


def write_checkpoint(
    uri: str | Path, config: GLMConfig, tensors: dict[str, torch.Tensor], tokenizer_model: bytes,
    metadata: dict[str, Any] | None = None, quantization: QuantSpec | None = None,
) -> str:
    """Write a checkpoint from a state dict (e.g. one converted tensor by tensor); returns `uri`."""
    from safetensors.torch import save_file

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        _write_config(staging, config, metadata, quantization)
        (staging / GLMTokenizer.MODEL_FILE).write_bytes(tokenizer_model)

    return _write_dir(str(uri), fill)


def publish_checkpoint(local_dir: str | Path, uri: str | Path) -> str:
    """Copy a finished local checkpoint directory to `uri` (replaced atomically when local)."""
    local_dir = Path(local_dir)
    names = (WEIGHTS_FILE, CONFIG_FILE, GLMTokenizer.MODEL_FILE)
    missing = [n for n in names if not (local_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"{local_dir} is not a complete checkpoint: missing {', '.join(missing)}")

    def fill(staging: Path) -> None:
        for name in names:
            shutil.copyfile(local_dir / name, staging / name)

    return _write_dir(str(uri), fill)


def _write_config(staging: Path, config: GLMConfig, metadata: dict[str, Any] | None,
                  quantization: QuantSpec | None) -> None:
    data: dict[str, Any] = {"format": FORMAT, "model": config.to_dict()}
    if quantization is not None:
        data["quantization"] = quantization.to_dict()
    data["metadata"] = metadata or {}
    (staging / CONFIG_FILE).write_text(json.dumps(data, indent=2))


def _write_dir(uri: str, fill: Callable[[Path], None]) -> str:
    """Let `fill` write the files into a staging directory, then make it the checkpoint at
    `uri` without a moment where none exists (`glm.checkpoint_dir`)."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "ckpt"
        staging.mkdir()
        fill(staging)
        publish(staging, uri, REQUIRED_FILES)
    return uri


def read_checkpoint_config(uri: str | Path) -> tuple[GLMConfig, dict[str, Any]]:
    """The model config and metadata of a checkpoint, without loading weights."""
    with _fetched(str(uri), only=(CONFIG_FILE,)) as local:
        config, metadata, _ = _parse_config(local / CONFIG_FILE)
        return config, metadata


def read_checkpoint_quantization(uri: str | Path) -> QuantSpec | None:
    """How a checkpoint is quantized (bits, group_size, scheme), or None for full precision."""
    with _fetched(str(uri), only=(CONFIG_FILE,)) as local:
        return _parse_config(local / CONFIG_FILE)[2]


def _parse_config(path: Path) -> tuple[GLMConfig, dict[str, Any], QuantSpec | None]:
    if not path.exists():
        raise FileNotFoundError(f"not an inference checkpoint: {path} is missing")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    spec = None
    if data.get("quantization") is not None:
        spec = QuantSpec.from_dict(data["quantization"], where=f"{path}: quantization")
    return GLMConfig.from_dict(data["model"], where=str(path)), data.get("metadata", {}), spec


def load_inference_checkpoint(
    uri: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GLMModel, GLMTokenizer]:
    """Load (model in eval mode, tokenizer) from a checkpoint directory or URI.

    Full-precision and quantized checkpoints alike: a quantized one comes back with
    `glm.quantization.QuantizedLinear` layers (integer weights, fp16 scales, which `dtype`
    leaves in fp16).
    """
    from safetensors.torch import load_model

    with _fetched(str(uri)) as local:
        config, _, spec = _parse_config(local / CONFIG_FILE)
        with torch.device("meta"):
            model = GLMModel(config)
            if spec is not None:
                prepare_quantized(model, spec)
        model = model.to_empty(device=device)
        load_model(model, str(local / WEIGHTS_FILE), strict=True, device=str(device))
        tokenizer = GLMTokenizer.load(local / GLMTokenizer.MODEL_FILE)
    if dtype is not None:
        model = cast_model(model, dtype)
    return model.eval(), tokenizer


class _fetched:
    """Context manager yielding a local directory with the checkpoint's files."""

    def __init__(self, uri: str, only: tuple[str, ...] | None = None):
        self.uri, self.only, self._tmp = uri, only, None

    def __enter__(self) -> Path:
        uri = current(self.uri, REQUIRED_FILES)  # or the previous version while it is being replaced
        if not _is_remote(uri):
            return Path(uri)
        self._tmp = tempfile.TemporaryDirectory()
        fs, path = from_uri(uri)
        names = self.only or REQUIRED_FILES
        for name in names:
            with fs.open_input_stream(f"{path}/{name}") as src, open(Path(self._tmp.name) / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

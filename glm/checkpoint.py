"""The inference checkpoint: a directory that quantize, eval and serve load.

    <dir>/model.safetensors   weights (no pickle); a tied lm_head is stored once
    <dir>/config.json         {"format": ..., "model": GLMConfig fields, "metadata": {...},
                               "quantization": {"bits", "group_size", "scheme"} (quantized only),
                               "weights": {"file", "bytes", "sha256"} (of model.safetensors)}
    <dir>/tokenizer.model     the SentencePiece model

Every writer records the weights file's size and SHA-256; loading verifies them (a truncated or
altered file is refused, naming the file) and refuses non-finite weights (naming the tensor).

`dir` may be a local path, an MLflow URI (`models:/NAME@ALIAS`, `runs:/...`: `glm.registry`) or a
URI (s3://, gs://, ...): remote directories are written to a
local temporary directory and copied with pyarrow's file systems (imported only then). A
checkpoint is replaced without a moment where none exists (`glm.checkpoint_dir`: locally `dir`
is a link to a versioned sibling directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from glm.checkpoint_dir import current, local_path, publish
from glm.config import GLMConfig
from glm.filesystems import from_uri, is_remote
from glm.model import GLMModel
from glm.int_quant import QuantSpec, cast_model, model_quantization, prepare_quantized
from glm.registry import is_mlflow_uri, local_checkpoint
from glm.tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)

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
        data = json.loads((staging / CONFIG_FILE).read_text())
        if data.get("weights"):
            _verify_weights(staging, data["weights"])  # never publish a damaged copy
        else:  # written before checksums were recorded: record them now
            data["weights"] = _weights_record(staging)
            (staging / CONFIG_FILE).write_text(json.dumps(data, indent=2))

    return _write_dir(str(uri), fill)


def _write_config(staging: Path, config: GLMConfig, metadata: dict[str, Any] | None,
                  quantization: QuantSpec | None) -> None:
    data: dict[str, Any] = {"format": FORMAT, "model": config.to_dict()}
    if quantization is not None:
        data["quantization"] = quantization.to_dict()
    data["metadata"] = metadata or {}
    data["weights"] = _weights_record(staging)  # the weights file is written before the config
    (staging / CONFIG_FILE).write_text(json.dumps(data, indent=2))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_record(directory: Path) -> dict[str, Any]:
    path = directory / WEIGHTS_FILE
    return {"file": WEIGHTS_FILE, "bytes": path.stat().st_size, "sha256": _file_sha256(path)}


def _check_size(directory: Path, record: dict[str, Any]) -> Path:
    path = directory / record.get("file", WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {path}")
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise ValueError(f"checkpoint weights {path} are damaged: {size} bytes, but the checkpoint recorded "
                         f"{record.get('bytes')} (truncated or replaced)")
    return path


def _verify_weights(directory: Path, record: dict[str, Any]) -> None:
    """Size, then SHA-256, of the weights file against the checkpoint's record (ValueError)."""
    path = _check_size(directory, record)
    digest = _file_sha256(path)
    if digest != record.get("sha256"):
        raise ValueError(f"checkpoint weights {path} are damaged: SHA-256 {digest} does not match the recorded "
                         f"{record.get('sha256')}")


def check_checkpoint_files(directory: str | Path) -> None:
    """Cheap check of a local checkpoint before handing it to a server: config readable and
    the weights file present with its recorded size (the full checksum is verified at load)."""
    directory = Path(directory)
    data = json.loads((directory / CONFIG_FILE).read_text())
    if data.get("weights"):
        _check_size(directory, data["weights"])
    elif not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {directory / WEIGHTS_FILE}")


def _check_finite(model: GLMModel, where: str) -> None:
    """Refuse weights with NaN or infinity, naming the first such tensor."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: tensor {name!r} has {bad} non-finite values (NaN or infinity); "
                             f"refusing to load these weights")


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


def weights_sha256(uri: str | Path) -> str:
    """The SHA-256 of a checkpoint's weights file as recorded in its config (computed for an
    older checkpoint without the record): the identity of its weights."""
    with _fetched(str(uri), only=(CONFIG_FILE,)) as local:
        record = json.loads((local / CONFIG_FILE).read_text()).get("weights") or {}
    if record.get("sha256"):
        return record["sha256"]
    with _fetched(str(uri)) as local:
        return _file_sha256(local / WEIGHTS_FILE)


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


@contextmanager
def verified_checkpoint(uri: str | Path) -> Iterator[tuple[Path, GLMConfig, dict[str, Any], QuantSpec | None]]:
    """(local directory, model config, metadata, quantization) of a checkpoint whose weights file
    matched its recorded size and SHA-256 (ValueError naming the file otherwise); a remote
    checkpoint is fetched to a temporary directory for the duration."""
    with _fetched(str(uri)) as local:
        config, metadata, spec = _parse_config(local / CONFIG_FILE)
        record = json.loads((local / CONFIG_FILE).read_text()).get("weights")
        if record:
            _verify_weights(local, record)
        else:
            logger.warning("%s was written without a weights checksum (an older checkpoint): not verified", uri)
        yield local, config, metadata, spec


def load_inference_checkpoint(
    uri: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GLMModel, GLMTokenizer]:
    """Load (model in eval mode, tokenizer) from a checkpoint directory or URI.

    Full-precision and quantized checkpoints alike: a quantized one comes back with
    `glm.quantization.QuantizedLinear` layers (integer weights, fp16 scales, which `dtype`
    leaves in fp16). The weights file is verified against its recorded size and SHA-256 and
    non-finite weights are refused (ValueError naming the file or the tensor).
    """
    from safetensors.torch import load_model

    with verified_checkpoint(uri) as (local, config, _, spec):
        with torch.device("meta"):
            model = GLMModel(config)
            if spec is not None:
                prepare_quantized(model, spec)
        model = model.to_empty(device=device)
        load_model(model, str(local / WEIGHTS_FILE), strict=True, device=str(device))
        tokenizer = GLMTokenizer.load(local / GLMTokenizer.MODEL_FILE)
    _check_finite(model, str(uri))
    if dtype is not None:
        model = cast_model(model, dtype)
    return model.eval(), tokenizer


def load_checkpoint_shard(directory: str | Path, tp, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None, gather_logits: bool = True):
    """One tensor-parallel rank's model (`glm.parallel.TPGLMModel`, eval mode) from a local
    checkpoint directory whose weights were verified already (`verified_checkpoint`, once for
    all ranks): only this rank's slices of the weights are read. Quantized checkpoints are
    sharded alike; non-finite weights are refused (ValueError naming the tensor)."""
    from glm.parallel import TPGLMModel, read_shard

    directory = Path(directory)
    config, _, spec = _parse_config(directory / CONFIG_FILE)
    model = TPGLMModel(config, tp, gather_logits=gather_logits, quantization=spec)
    model.load_state_dict(read_shard(directory / WEIGHTS_FILE, config, tp.rank, tp.size), strict=True)
    _check_finite(model, f"{directory} (tensor-parallel rank {tp.rank} of {tp.size})")
    model = model.to(device)
    if dtype is not None:
        model = cast_model(model, dtype)
    return model.eval()


class _fetched:
    """Context manager yielding a local directory with the checkpoint's files."""

    def __init__(self, uri: str, only: tuple[str, ...] | None = None):
        self.uri, self.only, self._tmp = uri, only, None

    def __enter__(self) -> Path:
        if is_mlflow_uri(self.uri):  # models:/NAME@ALIAS, runs:/ID/PATH: downloaded once, then local
            self.uri = local_checkpoint(self.uri)
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

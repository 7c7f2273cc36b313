"""The inference checkpoint: a directory that quantize, eval and serve load.

    <dir>/model.safetensors   weights (no pickle); a tied lm_head is stored once
    <dir>/config.json         {"format": ..., "model": GLMConfig fields, "metadata": {...}}
    <dir>/tokenizer.model     the SentencePiece model

`dir` may be a local path or a URI (s3://, gs://, ...): remote directories are written to a
local temporary directory and copied with pyarrow's file systems (imported only then).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from glm.config import GLMConfig
from glm.model import GLMModel
from glm.tokenizer import GLMTokenizer

FORMAT = "glm-inference-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def save_inference_checkpoint(
    model: GLMModel, tokenizer: GLMTokenizer, uri: str | Path, metadata: dict[str, Any] | None = None
) -> str:
    """Write model weights, config and tokenizer to `uri` (created or replaced); returns `uri`.

    Written to a temporary sibling first and renamed into place, so a crash never leaves a
    half-written checkpoint under the final name.
    """
    from safetensors.torch import save_model

    uri = str(uri)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "ckpt"
        staging.mkdir()
        save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(
            json.dumps({"format": FORMAT, "model": model.config.to_dict(), "metadata": metadata or {}}, indent=2)
        )
        tokenizer.save(staging / GLMTokenizer.MODEL_FILE)
        if _is_remote(uri):
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri)
            fs.create_dir(path, recursive=True)
            pafs.copy_files(str(staging), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            return uri
        final = _local_path(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging, partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    return uri


def read_checkpoint_config(uri: str | Path) -> tuple[GLMConfig, dict[str, Any]]:
    """The model config and metadata of a checkpoint, without loading weights."""
    with _fetched(str(uri), only=(CONFIG_FILE,)) as local:
        return _parse_config(local / CONFIG_FILE)


def _parse_config(path: Path) -> tuple[GLMConfig, dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"not an inference checkpoint: {path} is missing")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return GLMConfig.from_dict(data["model"], where=str(path)), data.get("metadata", {})


def load_inference_checkpoint(
    uri: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GLMModel, GLMTokenizer]:
    """Load (model in eval mode, tokenizer) from a checkpoint directory or URI."""
    from safetensors.torch import load_model

    with _fetched(str(uri)) as local:
        config, _ = _parse_config(local / CONFIG_FILE)
        with torch.device("meta"):
            model = GLMModel(config)
        model = model.to_empty(device=device)
        load_model(model, str(local / WEIGHTS_FILE), strict=True, device=str(device))
        tokenizer = GLMTokenizer.load(local / GLMTokenizer.MODEL_FILE)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


class _fetched:
    """Context manager yielding a local directory with the checkpoint's files."""

    def __init__(self, uri: str, only: tuple[str, ...] | None = None):
        self.uri, self.only, self._tmp = uri, only, None

    def __enter__(self) -> Path:
        if not _is_remote(self.uri):
            path = _local_path(self.uri)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint directory not found: {path}")
            return path
        import pyarrow.fs as pafs

        self._tmp = tempfile.TemporaryDirectory()
        fs, path = pafs.FileSystem.from_uri(self.uri)
        names = self.only or (WEIGHTS_FILE, CONFIG_FILE, GLMTokenizer.MODEL_FILE)
        for name in names:
            with fs.open_input_stream(f"{path}/{name}") as src, open(Path(self._tmp.name) / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

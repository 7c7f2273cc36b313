"""Paths and URIs for the stages: local paths and object stores (s3://, gs://, ...) through
pyarrow's file systems, so a config works the same on one machine and on a cluster."""

from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path

from glm.registry import is_mlflow_uri, local_checkpoint


def resolve(uri: str):
    """(pyarrow FileSystem, path within it) for a local path or URI; relative paths are made absolute."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    return pafs.FileSystem.from_uri(uri)  # an S3-compatible server: AWS_ENDPOINT_URL (glm/filesystems.py)


def expand(uri: str) -> tuple[object, list[str]]:
    """The files a path, directory or glob names, sorted (FileNotFoundError naming the URI if none)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if any(c in path for c in "*?["):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = "/".join(parts[:first]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith((".", "_"))]
        elif info.type == pafs.FileType.File:
            files = [path]
        else:
            files = []
    if not files:
        raise FileNotFoundError(f"no input files match {uri!r}")
    return fs, sorted(files)


def write_bytes(fs, path: str, data: bytes) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def replace_dir(fs, staging: str, final: str) -> None:
    """Move a finished staging directory into place, replacing an old output (object stores
    included: `glm.filesystems.move_dir`)."""
    from glm.filesystems import move_dir

    if exists(fs, final):
        fs.delete_dir(final)
    move_dir(fs, staging, final)


def absolute(uri: str) -> str:
    """A URI unchanged, a local path made absolute (Ray workers run in another directory)."""
    return uri if "://" in uri or is_mlflow_uri(uri) else str(Path(uri).expanduser().absolute())


def checkpoint(uri: str) -> str:
    """An inference checkpoint's location for a stage and its Ray workers: an MLflow URI
    (`models:/NAME@ALIAS`, `runs:/...`) resolved here, once, to its local download (the workers
    need no access to the tracking server); any other as `absolute`."""
    return local_checkpoint(uri) if is_mlflow_uri(uri) else absolute(uri)

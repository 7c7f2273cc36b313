"""Replacing an inference checkpoint directory with never a moment where none exists.

Local: the checkpoint path is a symbolic link to a versioned sibling directory,
`<name>.v<stamp>`; a new version is written completely beside it and the link is swapped with
one `rename` (atomic), then the old version is deleted. A reader opening `<name>` gets the old or
the new version, whole. A checkpoint from before this layout (a plain directory) is moved to a
version name first; in that moment (and after a crash within it) a reader recovers the newest
complete `<name>.v*`.

Object stores (no atomic rename of a prefix): the new files go to `<uri>.partial/`, the current
ones are moved to `<uri>.old/`, the new ones moved in, then `<uri>.old/` deleted. A reader
(`current`) takes `<uri>` when it is complete and `<uri>.old` otherwise, so a crash at any point
leaves a complete checkpoint to read and the next write repairs it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from glm.filesystems import from_uri, is_remote, move_dir


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def publish(staging: Path, uri: str, required: tuple[str, ...]) -> None:
    """Make the complete directory `staging` the checkpoint at `uri` (local path or URI)."""
    if is_remote(uri):
        _publish_remote(staging, uri, required)
    else:
        _publish_local(staging, local_path(uri))


def current(uri: str, required: tuple[str, ...]) -> str:
    """What a reader opens for the checkpoint at `uri`: `uri` itself, or during (or after a
    crash in) a replacement the complete previous version. FileNotFoundError when neither."""
    if is_remote(uri):
        fs, path = from_uri(uri)
        for candidate in (path, f"{path}.old"):
            if _complete(fs, candidate, required):
                return uri if candidate == path else f"{uri}.old"
        raise FileNotFoundError(f"checkpoint not found (or incomplete): {uri}")
    path = local_path(uri)
    if path.is_dir():
        return str(path)
    versions = [v for v in _versions(path) if all((v / name).exists() for name in required)]
    if versions:
        return str(versions[-1])
    raise FileNotFoundError(f"checkpoint directory not found: {path}")


def _publish_local(staging: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    version = final.with_name(f"{final.name}.v{time.time_ns():x}{uuid.uuid4().hex[:6]}")
    shutil.copytree(staging, version)
    link = final.with_name(f".{final.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(version.name, link)  # relative: the folder can be moved as a whole
    if final.is_dir() and not final.is_symlink():  # a checkpoint written before versioning
        final.rename(final.with_name(f"{final.name}.v0-{uuid.uuid4().hex[:6]}"))
    os.replace(link, final)  # the swap: one rename
    for old in _versions(final):
        if old != version:
            shutil.rmtree(old, ignore_errors=True)


def _versions(final: Path) -> list[Path]:
    """The versioned directories beside `final`, oldest first."""
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.iterdir()
             if p.name.startswith(f"{final.name}.v") and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def _publish_remote(staging: Path, uri: str, required: tuple[str, ...]) -> None:
    import pyarrow.fs as pafs

    fs, path = from_uri(uri)
    partial, old = f"{path}.partial", f"{path}.old"
    _delete(fs, partial)
    fs.create_dir(partial, recursive=True)
    pafs.copy_files(str(staging), partial, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if _complete(fs, path, required):
        _delete(fs, old)
        move_dir(fs, path, old)
    else:  # none yet, or the remains of a replacement that crashed (old/ holds the complete one)
        _delete(fs, path)
    move_dir(fs, partial, path)
    _delete(fs, old)


def _complete(fs, path: str, required: tuple[str, ...]) -> bool:
    import pyarrow.fs as pafs

    infos = fs.get_file_info([f"{path}/{name}" for name in required])
    return all(i.type == pafs.FileType.File for i in infos)


def _delete(fs, path: str) -> None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)

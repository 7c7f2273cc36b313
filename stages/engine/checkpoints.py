"""Engine checkpoints on any storage the stages use (a local or shared path, s3://, gs://).

Layout: <storage>/<run>/checkpoints/step00000008/ holds DeepSpeed's files for that step and,
written last, COMPLETE.json (the step, the world size, the ZeRO stage, and every file's name
and size). A checkpoint counts only when that record is present and every file it names has
its recorded size, so a worker killed at any point of a write leaves the previous checkpoint
in use. DeepSpeed writes to a local directory; on object stores each rank then uploads its
own files, so the same code serves both.

A checkpoint saved by N workers is loaded by M != N workers through DeepSpeed's universal
checkpoint: rank 0 converts it once (cached beside it as universal/, complete with its own
record) and every rank loads that.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass

from stages import storage

RECORD = "COMPLETE.json"
UNIVERSAL = "universal"
TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


@dataclass
class Found:
    """A complete checkpoint."""

    uri: str
    """The checkpoint directory (path or URI)."""
    record: dict
    """Its completion record (step, world, zero_stage, files)."""


class CheckpointStore:
    """The checkpoints of one run: <run_uri>/checkpoints/<tag>/."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri.rstrip("/")
        self.root_uri = posixpath.join(self.run_uri, "checkpoints")
        self.fs, self.root = storage.resolve(self.root_uri)
        self.local = "://" not in run_uri

    def uri(self, tag: str) -> str:
        return posixpath.join(self.root_uri, tag)

    def path(self, tag: str) -> str:
        return posixpath.join(self.root, tag)

    # -- writing ---------------------------------------------------------------------------

    def clear(self, tag: str) -> None:
        """Rank 0, before a save: remove a partial directory a killed attempt left under this tag."""
        if storage.exists(self.fs, self.path(tag)):
            self.fs.delete_dir(self.path(tag))

    def save_dir(self) -> str:
        """Where DeepSpeed writes (save_checkpoint(save_dir, tag)): the store itself when it is
        local, else a fresh local temporary directory that `upload` sends to the store."""
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            return self.root
        return tempfile.mkdtemp(prefix="engine_ckpt_")

    def upload(self, save_dir: str, tag: str) -> None:
        """This rank's files (object stores only), then the local copy is removed."""
        if self.local:
            return
        import pyarrow.fs as pafs

        try:
            if os.path.isdir(os.path.join(save_dir, tag)):  # a rank may hold no files of its own
                self.fs.create_dir(self.path(tag), recursive=True)
                pafs.copy_files(os.path.join(save_dir, tag), self.path(tag),
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        finally:
            shutil.rmtree(save_dir, ignore_errors=True)

    def complete(self, tag: str, record: dict) -> dict:
        """Rank 0, once every rank's files are written: the completion record, last."""
        files = self._files(self.path(tag))
        record = {**record, "tag": tag, "time": time.time(), "files": files}
        data = json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8")
        final = posixpath.join(self.path(tag), RECORD)
        if self.local:  # write then rename: the record is whole or absent
            tmp = final + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:  # an object PUT is atomic
            storage.write_bytes(self.fs, final, data)
        return record

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than
        the newest complete one; returns the deleted tags."""
        tags = self.tags()
        complete = [t for t in tags if self.verify(t)[0] is not None]
        if not complete:
            return []
        kept = set(complete[-keep:]) if keep > 0 else set(complete)
        newest = complete[-1]
        deleted = [t for t in tags if t not in kept and t < newest]
        for t in deleted:
            self.fs.delete_dir(self.path(t))
        return deleted

    # -- reading ---------------------------------------------------------------------------

    def tags(self) -> list[str]:
        """Checkpoint directories, oldest first."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos
                      if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(TAG_PREFIX))

    def verify(self, tag: str, sub: str = "") -> tuple[dict | None, str]:
        """(record, "") when the checkpoint (or its `sub` folder) is complete, else (None, why)."""
        base = posixpath.join(self.path(tag), sub) if sub else self.path(tag)
        try:
            record = json.loads(storage.read_bytes(self.fs, posixpath.join(base, RECORD)))
        except FileNotFoundError:
            return None, "no completion record (the write did not finish)"
        except (OSError, ValueError) as e:
            return None, f"unreadable completion record: {e}"
        actual = self._files(base)
        for name, size in record.get("files", {}).items():
            if name not in actual:
                return None, f"{name} is missing"
            if actual[name] != size:
                return None, f"{name} has {actual[name]} bytes, the record says {size}"
        return record, ""

    def latest(self) -> tuple[Found | None, list[tuple[str, str]]]:
        """(the newest complete checkpoint or None, [(newer incomplete checkpoint, why)])."""
        rejected = []
        for tag in reversed(self.tags()):
            record, why = self.verify(tag)
            if record is not None:
                return Found(self.uri(tag), record), rejected
            rejected.append((self.uri(tag), why))
        return None, rejected

    def _files(self, base: str) -> dict[str, int]:
        """Relative name -> size of every file under a checkpoint directory (the record and any
        universal conversion excluded)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        out = {}
        for i in infos:
            if i.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(i.path, base)
            if rel == RECORD or rel.endswith(".tmp") or rel.startswith(UNIVERSAL + "/"):
                continue
            out[rel] = i.size
        return out


def find_checkpoint(uri: str) -> Found | None:
    """The newest complete checkpoint of a run directory, or the checkpoint directory itself."""
    uri = uri.rstrip("/")
    base = posixpath.basename(uri)
    if base.startswith(TAG_PREFIX):
        store = CheckpointStore(posixpath.dirname(posixpath.dirname(uri)))
        record, why = store.verify(base)
        if record is None:
            raise ValueError(f"{uri}: not a complete engine checkpoint ({why})")
        return Found(uri, record)
    return CheckpointStore(uri).latest()[0]


def local_copy(found: Found, sub: str = "") -> tuple[str, str, str | None]:
    """(load_dir, tag, temporary_dir): DeepSpeed loads `load_dir/tag/`. A local checkpoint is
    used in place (its `sub` folder as the tag when given); a remote one is downloaded first."""
    fs, path = storage.resolve(found.uri)
    if "://" not in found.uri:
        return (path, sub, None) if sub else (posixpath.dirname(path), posixpath.basename(path), None)
    import pyarrow.fs as pafs

    tag = sub or posixpath.basename(path)
    tmp = tempfile.mkdtemp(prefix="engine_load_")
    pafs.copy_files(posixpath.join(path, sub) if sub else path, os.path.join(tmp, tag),
                    source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp, tag, tmp


def convert_to_universal(found: Found) -> None:
    """Rank 0: DeepSpeed's universal checkpoint of `found` into its universal/ folder (once)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    store = CheckpointStore(posixpath.dirname(posixpath.dirname(found.uri)))
    tag = posixpath.basename(found.uri)
    if store.verify(tag, UNIVERSAL)[0] is not None:
        return
    src_dir, src_tag, src_tmp = local_copy(found)
    out = tempfile.mkdtemp(prefix="engine_universal_")
    try:
        args = argparse.Namespace(
            input_folder=os.path.join(src_dir, src_tag), output_folder=os.path.join(out, UNIVERSAL),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True)
        ds_to_universal.main(args)
        dest = posixpath.join(store.path(tag), UNIVERSAL)
        if storage.exists(store.fs, dest):
            store.fs.delete_dir(dest)
        import pyarrow.fs as pafs

        store.fs.create_dir(dest, recursive=True)
        pafs.copy_files(os.path.join(out, UNIVERSAL), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=store.fs)
        files = {posixpath.relpath(i.path, dest): i.size for i in store.fs.get_file_info(
            pafs.FileSelector(dest, recursive=True)) if i.type == pafs.FileType.File}
        storage.write_bytes(store.fs, posixpath.join(dest, RECORD),
                            json.dumps({"files": files, "source": found.uri, "time": time.time()}, ensure_ascii=False).encode("utf-8"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if src_tmp:
            shutil.rmtree(src_tmp, ignore_errors=True)

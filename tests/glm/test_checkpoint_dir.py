"""Replacing an inference checkpoint never leaves a moment without one (local and object store)."""

import os
from pathlib import Path

import pytest

from glm import checkpoint_dir
from glm.checkpoint_dir import current, publish

REQUIRED = ("a.bin", "config.json")


def staged(tmp_path: Path, text: str) -> Path:
    d = tmp_path / f"staging-{text}"
    d.mkdir()
    for name in REQUIRED:
        (d / name).write_text(text)
    return d


def test_local_replacement_swaps_a_link_and_keeps_no_old_version(tmp_path):
    final = tmp_path / "out" / "model"
    publish(staged(tmp_path, "one"), str(final), REQUIRED)
    assert final.is_symlink() and (final / "a.bin").read_text() == "one"
    first = final.resolve()
    publish(staged(tmp_path, "two"), str(final), REQUIRED)
    assert (final / "config.json").read_text() == "two" and not first.exists()
    assert [p.name for p in final.parent.iterdir() if not p.is_symlink()] == [final.resolve().name]


def test_local_replacement_is_one_rename_of_the_link(tmp_path, monkeypatch):
    """At the moment of the swap the old version is still whole under the checkpoint's name."""
    final = tmp_path / "model"
    publish(staged(tmp_path, "one"), str(final), REQUIRED)
    seen = []
    replace = os.replace

    def watching(src, dst):
        seen.append((final / "a.bin").read_text())  # just before the swap: the old one
        replace(src, dst)
        seen.append((final / "a.bin").read_text())  # just after: the new one

    monkeypatch.setattr(checkpoint_dir.os, "replace", watching)
    publish(staged(tmp_path, "two"), str(final), REQUIRED)
    assert seen == ["one", "two"]


def test_a_plain_directory_from_before_is_replaced_and_a_reader_recovers_in_between(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    for name in REQUIRED:
        (final / name).write_text("legacy")
    seen = []
    replace = os.replace

    def watching(src, dst):
        seen.append(Path(current(str(final), REQUIRED), "a.bin").read_text())  # no link yet: a complete version
        replace(src, dst)

    monkeypatch.setattr(checkpoint_dir.os, "replace", watching)
    publish(staged(tmp_path, "new"), str(final), REQUIRED)
    assert seen in (["legacy"], ["new"]) and (final / "a.bin").read_text() == "new" and final.is_symlink()


def test_a_missing_checkpoint_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        current(str(tmp_path / "model"), REQUIRED)


class Recorder:
    """A pyarrow file system (local, standing in for an object store) that records, after every
    deleted or written file, what a reader would open."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.fs, self.uri, self.reads, self.watching = pafs.LocalFileSystem(), uri, [], False

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _after(self):
        if not self.watching:
            return
        path = current(self.uri, REQUIRED)
        self.reads.append(Path(path.removeprefix("mem://"), "a.bin").read_text())

    def delete_file(self, path):
        self.fs.delete_file(path)
        self._after()

    def copy_file(self, src, dst):
        self.fs.copy_file(src, dst)
        self._after()


def test_object_store_replacement_always_leaves_a_complete_checkpoint_to_read(tmp_path, monkeypatch):
    root = tmp_path / "bucket"
    uri = f"mem://{root / 'model'}"
    recorder = Recorder(uri)
    monkeypatch.setattr(checkpoint_dir, "is_remote", lambda u: u.startswith("mem://"))
    monkeypatch.setattr(checkpoint_dir, "from_uri", lambda u: (recorder, u.removeprefix("mem://")))
    import pyarrow.fs as pafs

    real_copy = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda src, dst, source_filesystem, destination_filesystem:
                        real_copy(src, dst, source_filesystem=source_filesystem, destination_filesystem=recorder.fs))
    publish(staged(tmp_path, "one"), uri, REQUIRED)
    recorder.watching = True
    publish(staged(tmp_path, "two"), uri, REQUIRED)
    assert recorder.reads and set(recorder.reads) <= {"one", "two"}  # a complete checkpoint at every point
    assert recorder.reads[-1] == "two" and recorder.reads.index("two") > 0
    assert sorted(p.name for p in root.iterdir()) == ["model"]  # no .partial / .old left

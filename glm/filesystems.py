"""What glm needs of pyarrow's file systems beyond `pyarrow.fs.FileSystem.from_uri` (pyarrow is
imported only when a URI is remote). An S3-compatible server (MinIO, moto) is named by
AWS_ENDPOINT_URL, which `from_uri` honours (checked with pyarrow 25 against moto; a bare
`pyarrow.fs.S3FileSystem()` does not, apache/arrow#49643): always open URIs with `from_uri`."""

from __future__ import annotations


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def from_uri(uri: str):
    """(pyarrow FileSystem, path within it) for a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def move_dir(fs, src: str, dst: str) -> None:
    """Move the directory `src` to `dst` on a pyarrow file system: one rename on a local disk;
    on an object store, which cannot rename a prefix (pyarrow's `move` refuses directories),
    every file copied before any is deleted, so `src` stays complete until `dst` is."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    fs.create_dir(dst, recursive=True)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.type == pafs.FileType.File]
    for file in files:
        target = dst + file[len(src):]
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(file, target)
    for file in files:
        fs.delete_file(file)
    if fs.get_file_info(src).type != pafs.FileType.NotFound:
        fs.delete_dir(src)

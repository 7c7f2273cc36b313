"""pyarrow file systems for URIs (imported only when a URI is remote). One addition to
`pyarrow.fs.FileSystem.from_uri`: an `s3://` URI honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
(an S3-compatible server: MinIO, Ceph, moto), which pyarrow's S3 file system ignores
(apache/arrow#49643) while boto3 and the AWS CLI use it."""

from __future__ import annotations

import os
from urllib.parse import urlparse


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def from_uri(uri: str):
    """(pyarrow FileSystem, path within it) for a URI."""
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and endpoint and not parsed.query:
        target = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        fs = pafs.S3FileSystem(endpoint_override=target.netloc, scheme=target.scheme, region=region)
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
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

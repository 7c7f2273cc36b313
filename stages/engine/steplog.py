"""The step log of a run: one JSON record per step and per event (a start, a rejected
checkpoint, a stop), every attempt kept, on any storage the stages use.

<storage>/<run>/steps/attempt-003.jsonl on a local or shared path (appended line by line);
on object stores, which cannot append, attempt-003-000012.jsonl chunks written at each flush.
Attempt numbers count the starts of the run (a restart after a crash is the next attempt).
"""

from __future__ import annotations

import json
import posixpath

from stages import storage

FOLDER = "steps"


class StepLog:
    """Rank 0's writer for one attempt."""

    def __init__(self, run_uri: str, attempt: int):
        self.fs, self.dir = storage.resolve(posixpath.join(run_uri, FOLDER))
        self.local = "://" not in run_uri
        self.attempt = attempt
        self.buffer: list[str] = []
        self.chunk = 0
        self.fs.create_dir(self.dir, recursive=True)

    def write(self, record: dict) -> None:
        line = json.dumps({"attempt": self.attempt, **record}, ensure_ascii=False) + "\n"
        if self.local:
            with open(posixpath.join(self.dir, f"attempt-{self.attempt:03d}.jsonl"), "a", encoding="utf-8") as f:
                f.write(line)
        else:
            self.buffer.append(line)

    def flush(self) -> None:
        if self.buffer:
            self.chunk += 1
            name = f"attempt-{self.attempt:03d}-{self.chunk:06d}.jsonl"
            storage.write_bytes(self.fs, posixpath.join(self.dir, name), "".join(self.buffer).encode())
            self.buffer = []


def attempts(run_uri: str) -> int:
    """How many attempts of the run have started (the next attempt's number)."""
    return len({name.split("-")[1].split(".")[0] for name in _files(run_uri)})


def read(run_uri: str) -> list[dict]:
    """Every record of the run, all attempts, in order."""
    fs, base = storage.resolve(posixpath.join(run_uri, FOLDER))
    records = []
    for name in _files(run_uri):
        text = storage.read_bytes(fs, posixpath.join(base, name)).decode()
        records += [json.loads(line) for line in text.splitlines() if line.strip()]
    return records


def _files(run_uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, base = storage.resolve(posixpath.join(run_uri, FOLDER))
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith("attempt-"))

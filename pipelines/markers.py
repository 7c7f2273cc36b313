"""What makes a stage skippable: its config hash (chained through the stages before it) and the
marker written when it finished, <work_dir>/pipeline/<stage>.json."""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import asdict

from stages import storage

MARKERS = "pipeline"
"""Folder of the markers under the work_dir."""


def fingerprint(cfg, upstream: str = "") -> str:
    """Hash of a stage config and of the stages before it (`upstream`: the previous stage's
    hash), so a change anywhere reruns everything after it; tracking excluded (where a stage
    logs does not change what it makes)."""
    d = asdict(cfg)
    d.pop("tracking", None)
    return hashlib.sha256(json.dumps([d, upstream], sort_keys=True, default=str).encode()).hexdigest()[:16]


class Markers:
    """<work_dir>/pipeline/<stage>.json: written when a stage finished, with its config hash and outputs."""

    def __init__(self, work_dir: str):
        self.fs, self.root = storage.resolve(posixpath.join(work_dir, MARKERS))

    def finished(self, stage: str, config_hash: str) -> dict | None:
        """The marker of `stage` when it finished with this config hash and its outputs exist."""
        path = posixpath.join(self.root, f"{stage}.json")
        if not storage.exists(self.fs, path):
            return None
        marker = json.loads(storage.read_bytes(self.fs, path))
        if marker.get("config_hash") != config_hash:
            return None
        fs_paths = [storage.resolve(uri) for uri in marker["outputs"].values()]
        return marker if all(storage.exists(fs, path) for fs, path in fs_paths) else None

    def write(self, stage: str, config_hash: str, outputs: dict, seconds: float) -> None:
        record = {"stage": stage, "config_hash": config_hash, "outputs": outputs, "seconds": seconds,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_bytes(self.fs, posixpath.join(self.root, f"{stage}.json"), json.dumps(record, indent=2).encode())

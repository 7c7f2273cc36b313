"""What makes a stage skippable: its config hash (chained through the stages before it) and the
marker written when it finished, <work_dir>/pipeline/<stage>.json."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import time

from stages import storage
from stages.tracking import json_text

MARKERS = "pipeline"
"""Folder of the markers under the work_dir."""


NOT_HASHED = {"tracking"}
"""Sections left out of a hash at any depth: where a stage logs does not change what it makes."""
ENGINE_NOT_HASHED = {"run_name", "fail_at_steps", "fail_rank", "max_failures"}
"""EngineConfig fields left out: the run name is derived from the hash (`pipelines.runs`); fault
injection and the restart budget change how a run gets there, not what it makes (exact resume),
so a rerun without them continues the interrupted run."""


def fingerprint(cfg, upstream: str = "") -> str:
    """Hash of a stage config and of the stages before it (`upstream`: the previous stage's
    hash), so a change anywhere reruns everything after it (`NOT_HASHED`, `ENGINE_NOT_HASHED` excluded)."""
    return hashlib.sha256(json.dumps([_hashed(cfg), upstream], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hashed(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        skip = NOT_HASHED | (ENGINE_NOT_HASHED if type(value).__name__ == "EngineConfig" else set())
        out = {f.name: _hashed(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in skip}
        if type(value).__name__ == "ModelSpec":  # what the preset name stands for: a changed preset retrains
            out["resolved"] = value.build().to_dict()
        return out
    if isinstance(value, dict):
        return {k: _hashed(v) for k, v in value.items() if k not in NOT_HASHED}
    if isinstance(value, (list, tuple)):
        return [_hashed(v) for v in value]
    return value


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

    def write(self, stage: str, config_hash: str, outputs: dict, seconds: float,
              runs: dict[str, str] | None = None) -> None:
        """`runs`: the stage's engine runs (label -> engine run name), for the record."""
        record = {"stage": stage, "config_hash": config_hash, "outputs": outputs, "seconds": seconds,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs or {}}
        storage.write_bytes(self.fs, posixpath.join(self.root, f"{stage}.json"), json_text(record).encode("utf-8"))

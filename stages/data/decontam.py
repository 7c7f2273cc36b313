"""Decontamination against evaluation tasks: long shared n-grams (no Ray here).

The driver builds an index of every n-gram (`ngram` words, or `cjk_ngram` characters for a
mostly Chinese text; `stages.data.shingles`) of every string field of every row of the
evaluation tasks (the task YAMLs the project ships, after their `where` filter, and any JSONL
files the config names). A training document sharing one n-gram with a task is removed and
counted for that task (GPT-3 and GLM-130B used 13-grams). Fields shorter than n tokens give
no n-gram, so short answers and labels never match.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages import storage
from stages.data.shingles import text_ngrams


@dataclass
class DecontamConfig:
    """Remove training documents that share a long n-gram with an evaluation task."""

    enabled: bool = True
    """Check every document (off: no decontamination)."""
    tasks: list[str] = field(default_factory=lambda: ["stages/eval/tasks"])
    """Task YAML files or directories (searched recursively), as `python -m stages.eval --tasks`."""
    files: dict[str, str] = field(default_factory=dict)
    """More evaluation sets: name -> JSONL path, glob or URI (every string field of every row)."""
    ngram: int = 13
    """n-gram length in words."""
    cjk_ngram: int = 13
    """n-gram length in characters for mostly-Chinese text."""


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _rows(uri: str, where: dict | None = None):
    fs, files = storage.expand(uri)
    for file in files:
        for line in storage.read_bytes(fs, file).decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            if where and any(str(row.get(k)) not in map(str, v) for k, v in where.items()):
                continue
            yield row


REPO_ROOT = Path(__file__).resolve().parents[2]


def _repo_path(path: str) -> str:
    """A URI or absolute path unchanged; a relative path from the working directory when it
    exists there, else from the repo root (as `python -m stages.eval --tasks` resolves them)."""
    if "://" in path or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(REPO_ROOT / path)


def task_sources(cfg: DecontamConfig) -> list[tuple[str, str, dict]]:
    """(task name, data URI, where filter) of every evaluation set. Reads the task YAMLs' `name`,
    `data`, `few_shot_data` and `where` directly (stages.eval would import torch)."""
    import yaml

    out = []
    files: list[Path] = []
    for p in cfg.tasks:
        path = Path(_repo_path(p))
        if path.is_dir():
            files += sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"decontamination: task path not found: {p}")
    for file in sorted(set(f.resolve() for f in files)):
        task = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(task, dict) or "data" not in task:
            continue
        name, where = str(task.get("name", file.stem)), dict(task.get("where") or {})
        for key in ("data", "few_shot_data"):
            if task.get(key):
                data = str(task[key])  # as stages.eval.tasks.data_uri: relative to the repo root
                out.append((name, data if "://" in data or Path(data).is_absolute() else str(REPO_ROOT / data), where))
    out += [(name, uri, {}) for name, uri in sorted(cfg.files.items())]
    return out


def input_files(cfg: DecontamConfig) -> list[str]:
    """The evaluation files read (for the stage's input fingerprint)."""
    if not cfg.enabled:
        return []
    return sorted({uri for _, uri, _ in task_sources(cfg)})


def build_index(cfg: DecontamConfig) -> dict:
    """{"names": task names, "keys": sorted uint64 n-gram hashes, "tasks": task index per key,
    "ngrams": n-grams per task}."""
    names: list[str] = []
    keys, owners = [], []
    cache: dict[str, int] = {}
    for name, uri, where in task_sources(cfg):
        if name not in names:
            names.append(name)
        t = names.index(name)
        grams = [text_ngrams(s, cfg.ngram, cfg.cjk_ngram, cache) for row in _rows(uri, where) for s in _strings(row)]
        grams = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)
        keys.append(grams)
        owners.append(np.full(len(grams), t, dtype=np.int32))
    if not keys:
        return {"names": [], "keys": np.zeros(0, np.uint64), "tasks": np.zeros(0, np.int32), "ngrams": {}}
    k, o = np.concatenate(keys), np.concatenate(owners)
    pairs = np.unique(np.stack([k, o.astype(np.uint64)], axis=1), axis=0)  # sorted by key, then task
    per_task = np.bincount(pairs[:, 1].astype(np.int64), minlength=len(names))
    return {"names": names, "keys": pairs[:, 0].copy(), "tasks": pairs[:, 1].astype(np.int32),
            "ngrams": {n: int(c) for n, c in zip(names, per_task)}}


def to_bytes(index: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, keys=index["keys"], tasks=index["tasks"], names=np.array(index["names"], dtype=object))
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    z = np.load(io.BytesIO(data), allow_pickle=True)
    return {"keys": z["keys"], "tasks": z["tasks"], "names": [str(n) for n in z["names"]]}


def matches(text: str, index: dict, cfg: DecontamConfig, cache: dict | None = None,
            toks: list[str] | None = None, hashes: np.ndarray | None = None) -> list[int]:
    """Indices of the tasks sharing an n-gram with the text (sorted; empty = clean)."""
    keys = index["keys"]
    if len(keys) == 0:
        return []
    grams = text_ngrams(text, cfg.ngram, cfg.cjk_ngram, cache, toks, hashes)
    pos = np.minimum(np.searchsorted(keys, grams), len(keys) - 1)
    hit = grams[keys[pos] == grams]
    if len(hit) == 0:
        return []
    lo, hi = np.searchsorted(keys, hit, "left"), np.searchsorted(keys, hit, "right")
    return sorted({int(t) for a, b in zip(lo.tolist(), hi.tolist()) for t in index["tasks"][a:b].tolist()})


def cached_index(cfg: DecontamConfig) -> tuple[bytes, list[str]]:
    """(index bytes, task names), from a local cache keyed by the config and every evaluation
    file's size and modification time ($GLM_CACHE or ~/.cache/glm-pipeline/decontam): the
    shipped tasks' index takes seconds to build and rarely changes."""
    import hashlib
    import os
    from pathlib import Path

    import pyarrow.fs as pafs

    parts = [json.dumps([cfg.tasks, sorted(cfg.files.items()), cfg.ngram, cfg.cjk_ngram])]
    for name, uri, where in task_sources(cfg):
        fs, files = storage.expand(uri)
        parts.append(json.dumps([name, where], sort_keys=True))
        parts += [f"{i.path}:{i.size}:{i.mtime_ns}" for i in fs.get_file_info(files) if i.type == pafs.FileType.File]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    root = Path(os.environ.get("GLM_CACHE", Path.home() / ".cache" / "glm-pipeline")) / "decontam"
    path = root / f"{key}.npz"
    if path.exists():
        data = path.read_bytes()
        return data, from_bytes(data)["names"]
    index = build_index(cfg)
    data = to_bytes(index)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:  # a read-only home: no cache, same result
        pass
    return data, index["names"]

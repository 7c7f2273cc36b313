"""Task YAMLs -> TaskConfigs, and their data files -> Items (with few-shot demonstrations)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from glm.config import ConfigError, load_yaml
from stages import storage
from stages.eval.adapters import ADAPTERS, Item
from stages.eval.config import TaskConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SHOT_SEPARATOR = "\n\n"


@dataclass
class TaskData:
    """A task's items ready to score, and the rows that could not be used (by reason)."""

    items: list[Item]
    skipped: dict[str, int] = field(default_factory=dict)


def find_task_files(paths: list[str]) -> list[Path]:
    """Task YAML files named by `paths` (files, or directories searched recursively), sorted, unique."""
    found: list[Path] = []
    for p in paths:
        path = Path(p) if Path(p).is_absolute() or Path(p).exists() else REPO_ROOT / p
        if path.is_dir():
            found += sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"task path not found: {p}")
    unique = sorted(set(f.resolve() for f in found))
    if not unique:
        raise FileNotFoundError(f"no task YAML files under {', '.join(paths)}")
    return unique


def load_tasks(paths: list[str]) -> list[TaskConfig]:
    """TaskConfigs of every YAML under `paths`; task names must be unique."""
    tasks, where = [], {}
    for file in find_task_files(paths):
        task = load_yaml(TaskConfig, file)
        if task.format not in ADAPTERS:
            raise ConfigError(f"{file}: format {task.format!r} is unknown; known: {', '.join(ADAPTERS)}")
        if task.name in where:
            raise ConfigError(f"{file}: task name {task.name!r} is also used by {where[task.name]}")
        where[task.name] = file
        tasks.append(task)
    return tasks


def task_groups(tasks: list[TaskConfig]) -> dict[str, list[str]]:
    """Group name -> its task names; a group named like a task is an error (metric names would collide)."""
    groups: dict[str, list[str]] = {}
    for t in tasks:
        for g in t.groups:
            groups.setdefault(g, []).append(t.name)
    clash = sorted(set(groups) & {t.name for t in tasks})
    if clash:
        raise ConfigError(f"group name(s) {clash} are also task names: metric names would collide")
    return groups


def data_uri(path: str) -> str:
    """A URI unchanged; a relative path taken from the repo root."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(REPO_ROOT / path)


def data_files(task: TaskConfig, path: str) -> tuple[object, list[str]]:
    """(file system, files) of a task's data path; FileNotFoundError naming the task and path."""
    uri = data_uri(path)
    fs, local = storage.resolve(uri)
    import pyarrow.fs as pafs

    if fs.get_file_info(local).type == pafs.FileType.Directory:
        uri = posixpath.join(uri, task.file_pattern)
    try:
        return storage.expand(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"task {task.name!r}: data file not found: {path} (looked for {uri})") from None


def _rows(task: TaskConfig, path: str, skipped: dict[str, int]):
    """(native row, Item) for each usable row of the files at `path`, after the `where` filter."""
    fs, files = data_files(task, path)
    adapt = ADAPTERS[task.format]
    for file in files:
        for line in storage.read_bytes(fs, file).decode("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad_json"] = skipped.get("bad_json", 0) + 1
                continue
            if any(str(row.get(k)) not in map(str, v) for k, v in task.where.items()):
                continue
            try:
                item = adapt(row)
            except (KeyError, ValueError, TypeError, IndexError):  # a missing field or a label out of range
                skipped["bad_row"] = skipped.get("bad_row", 0) + 1
                continue
            if _usable(task, item):
                yield row, item
            else:
                skipped["missing_fields"] = skipped.get("missing_fields", 0) + 1


def _usable(task: TaskConfig, item: Item) -> bool:
    if task.type == "multiple_choice":
        return len(item.choices) >= 2 and 0 <= item.label < len(item.choices) and all(item.choices)
    if task.type == "generation":
        return bool(item.inputs and item.targets)
    if "last_word_accuracy" in task.metrics and not (item.inputs and item.targets):
        return False
    return bool(item.text) or not ({"perplexity", "bits_per_byte"} & set(task.metrics))


def load_task_data(task: TaskConfig, max_items: int = 0) -> TaskData:
    """The task's items (first `max_items`, 0 = task.max_items or all), few-shot examples prepended."""
    skipped: dict[str, int] = {}
    limit = max_items or task.max_items
    pairs = []
    for pair in _rows(task, task.data, skipped):
        pairs.append(pair)
        if limit and len(pairs) == limit:
            break
    if not pairs:
        raise ValueError(f"task {task.name!r}: no usable items in {task.data} (skipped: {skipped or 'none'})")
    if task.few_shot:
        shots = list(_rows(task, task.few_shot_data, {}))
        for row, item in pairs:
            key = row.get(task.few_shot_match) if task.few_shot_match else None
            demos = [s for r, s in shots if key is None or r.get(task.few_shot_match) == key][:task.few_shot]
            item.inputs = SHOT_SEPARATOR.join([f"{d.inputs} {d.answer()}" for d in demos] + [item.inputs])
    return TaskData([item for _, item in pairs], skipped)

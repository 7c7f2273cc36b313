"""The evaluation report's files: where a run writes them (a path of its own per run) and the
results table in lm-evaluation-harness's layout (markdown, printed and written beside the JSON)."""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any

from stages import storage
from stages.eval.metrics import LOWER_IS_BETTER

TABLE_SUFFIX = ".md"
SAMPLES_SUFFIX = ".samples.jsonl"


def report_uri(template: str, run_name: str, started: float) -> str:
    """`template` (EvalConfig.output) with `{run_name}` and `{time}` filled in; a timed name that
    already exists (two runs in one second) gets -2, -3 ... so no run overwrites another's report."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    uri = template.format(run_name=run_name, time=stamp)
    if "{time}" not in template:
        return uri  # a fixed path: the user's choice
    stem, ext = posixpath.splitext(uri)
    fs, path = storage.resolve(uri)
    n = 1
    while storage.exists(fs, path):
        n += 1
        uri = f"{stem}-{n}{ext}"
        fs, path = storage.resolve(uri)
    return uri


def beside(report: str, suffix: str) -> str:
    """A file next to the JSON report: report.json -> report.md, report.samples.jsonl."""
    stem, ext = posixpath.splitext(report)
    return (stem if ext == ".json" else report) + suffix


def write_text(uri: str, text: str) -> None:
    """UTF-8 text to a path or URI, whole or not at all (written aside, then moved)."""
    fs, path = storage.resolve(uri)
    partial = path + ".partial"
    storage.write_bytes(fs, partial, text.encode("utf-8"))
    fs.move(partial, path)


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _number(value: float | None) -> str:
    return "N/A" if value is None else f"{value:.4f}"


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"

    rule = "|" + "|".join("-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def table(report: dict[str, Any]) -> str:
    """The report as lm-eval prints it: a row per task and metric (version, n-shot, value,
    standard error, and the chance and majority baselines where the metric has them), then the
    groups."""
    rows = []
    for name, task in report["tasks"].items():
        for i, (metric, value) in enumerate(task["metrics"].items()):
            baseline = task.get("baselines", {}).get(metric, {})
            rows.append([name if i == 0 else "", str(task.get("version", "")) if i == 0 else "",
                         str(task.get("n_shot", "")) if i == 0 else "", metric,
                         "↓" if metric in LOWER_IS_BETTER else "↑", _number(value), "±",
                         _number(task.get("stderr", {}).get(metric)),
                         _number(baseline["chance"]) if "chance" in baseline else "",
                         _number(baseline["majority"]) if "majority" in baseline else "",
                         str(task["items"]) if i == 0 else ""])
    out = _markdown(["Tasks", "Version", "n-shot", "Metric", "", "Value", "", "Stderr", "Chance", "Majority", "Items"],
                    rows, right={1, 2, 5, 7, 8, 9, 10})
    groups = []
    for name, group in report.get("groups", {}).items():
        for i, (metric, value) in enumerate(group["metrics"].items()):
            groups.append([name if i == 0 else "", metric, "↓" if metric in LOWER_IS_BETTER else "↑", _number(value),
                           "±", _number(group.get("stderr", {}).get(metric)), str(group["items"]) if i == 0 else ""])
    if groups:
        out += "\n\n" + _markdown(["Groups", "Metric", "", "Value", "", "Stderr", "Items"], groups, right={3, 5, 6})
    return out + "\n"

"""The evaluation stage: score a checkpoint on task YAMLs, report per task and per group.

`run(EvalConfig) -> report`: tasks run as parallel Ray tasks when Ray is up in this process
(each loads the checkpoint), else one after another on one loaded model. The report (a dict,
also written as JSON to `config.output`) holds every task's metrics, item counts and skipped
rows, the group means, and the flat `<task>/<metric>`, `<group>/<metric>` metrics that go
to MLflow.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

from stages import storage
from stages.eval.config import EvalConfig, TaskConfig
from stages.eval.metrics import exact_match, f1, group_means
from stages.eval.tasks import data_files, data_uri, load_task_data, load_tasks, task_groups
from stages.tracking import stage_run

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(f"[eval] {message}", flush=True)


class _Progress:
    """Counts scored units of a task and prints at most every few seconds, and at the end."""

    def __init__(self, task: str, total: int, unit: str, log: Log, every_s: float = 5.0):
        self.task, self.total, self.unit, self.log, self.every_s = task, total, unit, log, every_s
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            self.log(f"{self.task}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate_task(model, tokenizer, task: TaskConfig, *, batch_size: int, max_items: int = 0,
                  log: Log = _log) -> dict[str, Any]:
    """Score one task; returns {type, metrics, items, skipped, groups, seconds[, nll, tokens, bytes]}."""
    from stages.eval import scoring

    start = time.perf_counter()
    data = load_task_data(task, max_items)
    items, special = data.items, tokenizer.special
    max_len = min(task.max_length, model.config.max_seq_len)
    mask = special.gmask if task.mask == "[gMASK]" else special.mask
    log(f"{task.name}: {len(items)} items ({task.type})" + (f", skipped {data.skipped}" if data.skipped else ""))
    metrics: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if task.type == "multiple_choice":
        requests = [(tokenizer.encode(it.inputs), [tokenizer.encode(c) for c in it.choices]) for it in items]
        scores = scoring.score_continuations(model, special, requests, mask_token=mask, max_len=max_len,
                                             batch_size=batch_size, progress=_Progress(task.name, len(items), "items", log))
        raw = [max(range(len(s)), key=lambda j: s[j].logprob) for s in scores]
        norm = [max(range(len(s)), key=lambda j: s[j].logprob / s[j].tokens) for s in scores]
        metrics["accuracy"] = sum(p == it.label for p, it in zip(raw, items)) / len(items)
        metrics["accuracy_norm"] = sum(p == it.label for p, it in zip(norm, items)) / len(items)
    elif task.type == "generation":
        spans = scoring.generate_answers(model, special, [tokenizer.encode(it.inputs) for it in items], mask_token=mask,
                                         max_len=max_len, config=task.generation, vocab_limit=len(tokenizer),
                                         batch_size=batch_size, progress=_Progress(task.name, len(items), "items", log))
        answers = [tokenizer.decode(s).strip() for s in spans]
        metrics["exact_match"] = sum(exact_match(a, it.targets, task.normalization) for a, it in zip(answers, items)) / len(items)
        metrics["f1"] = sum(f1(a, it.targets, task.normalization) for a, it in zip(answers, items)) / len(items)
        extra["examples"] = [{"prediction": a, "references": it.targets} for a, it in zip(answers[:3], items)]
    else:
        if {"perplexity", "bits_per_byte"} & set(task.metrics):
            docs = [tokenizer.encode(it.text) for it in items]
            stride = min(task.stride or max_len // 2, max_len - 2)
            per_doc = scoring.window_nll(model, special, docs, max_len=max_len, stride=stride,
                                         batch_size=batch_size, progress=_Progress(task.name, sum(
                                             math.ceil(len(d) / stride) for d in docs), "windows", log))
            nll, tokens = sum(n for n, _ in per_doc), sum(t for _, t in per_doc)
            n_bytes = sum(len(it.text.encode("utf-8")) for it in items)
            metrics["perplexity"] = math.exp(nll / tokens)
            metrics["bits_per_byte"] = nll / math.log(2) / n_bytes
            extra.update(nll=nll, tokens=tokens, bytes=n_bytes)
        if "last_word_accuracy" in task.metrics:
            requests = [(tokenizer.encode(it.inputs), [tokenizer.encode(it.targets[0])]) for it in items]
            scores = scoring.score_continuations(model, special, requests, mask_token=mask, max_len=max_len,
                                                 batch_size=batch_size, progress=_Progress(task.name, len(items), "items", log))
            metrics["last_word_accuracy"] = sum(s[0].greedy for s in scores) / len(items)
    seconds = time.perf_counter() - start
    log(f"{task.name}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in task.metrics) + f" ({seconds:.1f} s)")
    return {"type": task.type, "metrics": {k: metrics[k] for k in task.metrics}, "items": len(items),
            "skipped": data.skipped, "groups": task.groups, "seconds": round(seconds, 3), **extra}


def _evaluate_tasks_here(cfg: EvalConfig, tasks: list[TaskConfig], device: str) -> dict[str, dict]:
    from glm.checkpoint import load_inference_checkpoint

    model, tokenizer = load_inference_checkpoint(cfg.checkpoint, device=device)
    return {t.name: evaluate_task(model, tokenizer, t, batch_size=cfg.batch_size, max_items=cfg.max_items) for t in tasks}


def _evaluate_tasks_on_ray(cfg: EvalConfig, tasks: list[TaskConfig], device: str) -> dict[str, dict]:
    import ray

    def one(checkpoint: str, task: TaskConfig, batch_size: int, max_items: int, device: str) -> dict:
        from glm.checkpoint import load_inference_checkpoint

        model, tokenizer = load_inference_checkpoint(checkpoint, device=device)
        return evaluate_task(model, tokenizer, task, batch_size=batch_size, max_items=max_items)

    remote = ray.remote(one).options(num_cpus=cfg.cpus_per_task, num_gpus=1 if device.startswith("cuda") else 0)
    refs = {t.name: remote.remote(cfg.checkpoint, t, cfg.batch_size, cfg.max_items, device) for t in tasks}
    _log(f"{len(refs)} tasks submitted to Ray")
    return dict(zip(refs, ray.get(list(refs.values()))))


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _write_report(uri: str, report: dict) -> None:
    fs, path = storage.resolve(uri)
    partial = path + ".partial"
    storage.write_bytes(fs, partial, json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))
    fs.move(partial, path)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` on `cfg.tasks`; returns the report (its URI under "report_uri")."""
    from glm.checkpoint import read_checkpoint_config

    start = time.perf_counter()
    cfg.checkpoint, cfg.output = storage.checkpoint(cfg.checkpoint), storage.absolute(cfg.output)
    tasks = load_tasks(cfg.tasks)
    groups = task_groups(tasks)
    for t in tasks:  # fail before any model is loaded when a data file is missing
        data_files(t, t.data)
        if t.few_shot:
            data_files(t, t.few_shot_data)
        # absolute from here on: Ray workers may run from another copy of the repo (a job's working_dir)
        t.data = data_uri(t.data)
        t.few_shot_data = data_uri(t.few_shot_data) if t.few_shot_data else ""
    model_config, metadata = read_checkpoint_config(cfg.checkpoint)
    device = resolve_device(cfg.device)
    on_ray = cfg.parallel == "ray" or (cfg.parallel == "auto" and _ray_is_up())
    if cfg.parallel == "ray" and not _ray_is_up():
        from stages.cluster import ensure_ray

        ensure_ray(min_cpus=2)
    _log(f"{len(tasks)} tasks on {cfg.checkpoint} ({device}, {'Ray tasks' if on_ray else 'in this process'})")
    params = {"checkpoint": cfg.checkpoint, "tasks": [t.name for t in tasks], "batch_size": cfg.batch_size,
              "max_items": cfg.max_items, "device": device, "checkpoint_metadata": metadata,
              "model": asdict(model_config)}
    with stage_run(cfg.tracking.enabled, cfg.run_name, params, cfg.tracking.experiment, cfg.tracking.tracking_uri) as tracker:
        evaluate = _evaluate_tasks_on_ray if on_ray else _evaluate_tasks_here
        results = evaluate(cfg, tasks, device)
        results = {t.name: results[t.name] for t in tasks}
        group_results = group_means(results, groups)
        flat = {f"{name}/{k}": v for name, r in {**results, **group_results}.items() for k, v in r["metrics"].items()}
        flat.update({f"{name}/items": r["items"] for name, r in {**results, **group_results}.items()})
        report = {"checkpoint": cfg.checkpoint, "checkpoint_metadata": metadata, "tasks": results,
                  "groups": group_results, "metrics": flat, "seconds": round(time.perf_counter() - start, 3),
                  "report_uri": cfg.output, "mlflow_run_id": tracker.run_id}
        tracker.log_metrics(flat)
        tracker.set_tags({"checkpoint": cfg.checkpoint, "checkpoint_stage": str(metadata.get("stage", ""))})
        tracker.log_dict(report, "eval_report.json")
        _write_report(cfg.output, report)
    _log(f"report written to {cfg.output}")
    return report

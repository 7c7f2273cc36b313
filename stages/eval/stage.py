"""The evaluation stage: score a checkpoint on task YAMLs, report per task and per group.

`run(EvalConfig) -> report`: tasks run as parallel Ray tasks when Ray is up in this process
(each loads the checkpoint), else one after another on one loaded model. The report (a dict,
also written as JSON to `config.output`, a path of its own per run) holds every task's
metrics with their standard errors and baselines, version, n-shot, item counts and skipped
rows, the group means, and the flat `<task>/<metric>`, `<group>/<metric>` metrics (and their
`_stderr`) that go to MLflow; beside it go the table (`.md`) and optionally the per-item log.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

from stages import storage
from stages.eval.config import EvalConfig, TaskConfig
from stages.eval.metrics import (BINOMIAL, binomial_stderr, bits_per_byte_of, bootstrap_stderr, choice_baselines,
                                 exact_match, f1, group_means, majority_answer, mean_of, perplexity_of)
from stages.eval.report import SAMPLES_SUFFIX, TABLE_SUFFIX, beside, jsonl, report_uri, table, write_text
from stages.eval.tasks import data_files, data_uri, load_task_data, load_tasks, task_groups
from stages.tracking import json_text, stage_run

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
                  bootstrap_iters: int = 1000, seed: int = 1234, log_samples: bool = False,
                  log: Log = _log) -> dict[str, Any]:
    """Score one task; returns {type, version, n_shot, metrics, stderr, baselines, items, skipped,
    groups, seconds[, nll, tokens, bytes][, examples][, samples (with `log_samples`)]}."""
    from stages.eval import scoring

    start = time.perf_counter()
    data = load_task_data(task, max_items)
    items, special = data.items, tokenizer.special
    max_len = min(task.max_length, model.config.max_seq_len)
    mask = special.gmask if task.mask == "[gMASK]" else special.mask
    log(f"{task.name}: {len(items)} items ({task.type})" + (f", skipped {data.skipped}" if data.skipped else ""))
    per_item: dict[str, list[float]] = {}  # metric -> one score per item (the share metrics, f1)
    stderr: dict[str, float | None] = {}
    baselines: dict[str, dict[str, float]] = {}
    samples = [{"task": task.name, "index": i, "prompt": it.inputs} for i, it in enumerate(items)]
    extra: dict[str, Any] = {}
    if task.type == "multiple_choice":
        requests = [(tokenizer.encode(it.inputs), [tokenizer.encode(c) for c in it.choices]) for it in items]
        scores = scoring.score_continuations(model, special, requests, mask_token=mask, max_len=max_len,
                                             batch_size=batch_size, progress=_Progress(task.name, len(items), "items", log))
        raw = [max(range(len(s)), key=lambda j: s[j].logprob) for s in scores]
        norm = [max(range(len(s)), key=lambda j: s[j].logprob / s[j].tokens) for s in scores]
        per_item["accuracy"] = [float(p == it.label) for p, it in zip(raw, items)]
        per_item["accuracy_norm"] = [float(p == it.label) for p, it in zip(norm, items)]
        chance_majority = choice_baselines([len(it.choices) for it in items], [it.label for it in items])
        baselines = {"accuracy": chance_majority, "accuracy_norm": chance_majority}
        for sample, it, s, p, q in zip(samples, items, scores, raw, norm):
            sample.update(choices=it.choices, target=it.choices[it.label], prediction=it.choices[p],
                          prediction_norm=it.choices[q], logprobs=[c.logprob for c in s])
    elif task.type == "generation":
        spans = scoring.generate_answers(model, special, [tokenizer.encode(it.inputs) for it in items], mask_token=mask,
                                         max_len=max_len, config=task.generation, vocab_limit=len(tokenizer),
                                         batch_size=batch_size, progress=_Progress(task.name, len(items), "items", log))
        answers = [tokenizer.decode(s).strip() for s in spans]
        per_item["exact_match"] = [exact_match(a, it.targets, task.normalization) for a, it in zip(answers, items)]
        per_item["f1"] = [f1(a, it.targets, task.normalization) for a, it in zip(answers, items)]
        constant = majority_answer([it.targets for it in items], task.normalization)
        baselines = {name: {"majority": sum(fn(constant, it.targets, task.normalization) for it in items) / len(items)}
                     for name, fn in (("exact_match", exact_match), ("f1", f1))}
        extra["examples"] = [{"prediction": a, "references": it.targets} for a, it in zip(answers[:3], items)]
        for sample, it, answer in zip(samples, items, answers):
            sample.update(target=it.targets, prediction=answer)
    else:
        if {"perplexity", "bits_per_byte"} & set(task.metrics):
            docs = [tokenizer.encode(it.text) for it in items]
            stride = min(task.stride or max_len // 2, max_len - 2)
            per_doc = scoring.window_nll(model, special, docs, max_len=max_len, stride=stride,
                                         batch_size=batch_size, progress=_Progress(task.name, sum(
                                             math.ceil(len(d) / stride) for d in docs), "windows", log))
            doc_bytes = [len(it.text.encode("utf-8")) for it in items]
            nll, tokens, n_bytes = sum(n for n, _ in per_doc), sum(t for _, t in per_doc), sum(doc_bytes)
            extra.update(nll=nll, tokens=tokens, bytes=n_bytes)
            doc_nll = [n for n, _ in per_doc]
            stderr["perplexity"] = bootstrap_stderr(perplexity_of, [doc_nll, [t for _, t in per_doc]], bootstrap_iters, seed)
            stderr["bits_per_byte"] = bootstrap_stderr(bits_per_byte_of, [doc_nll, doc_bytes], bootstrap_iters, seed)
            for sample, it, (n, t), b in zip(samples, items, per_doc, doc_bytes):
                sample.update(text=it.text, nll=n, tokens=t, bytes=b)
        if "last_word_accuracy" in task.metrics:
            requests = [(tokenizer.encode(it.inputs), [tokenizer.encode(it.targets[0])]) for it in items]
            scores = scoring.score_continuations(model, special, requests, mask_token=mask, max_len=max_len,
                                                 batch_size=batch_size, progress=_Progress(task.name, len(items), "items", log))
            per_item["last_word_accuracy"] = [float(s[0].greedy) for s in scores]
            for sample, it, s in zip(samples, items, scores):
                sample.update(target=it.targets[0], prediction_is_target=bool(s[0].greedy), logprob=s[0].logprob)
    metrics = {name: sum(values) / len(items) for name, values in per_item.items()}
    if "nll" in extra:
        metrics["perplexity"] = math.exp(extra["nll"] / extra["tokens"])
        metrics["bits_per_byte"] = extra["nll"] / math.log(2) / extra["bytes"]
    for name, values in per_item.items():
        stderr[name] = binomial_stderr(metrics[name], len(items)) if name in BINOMIAL else \
            bootstrap_stderr(mean_of, [values], bootstrap_iters, seed)
    seconds = time.perf_counter() - start
    log(f"{task.name}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in task.metrics) + f" ({seconds:.1f} s)")
    result = {"type": task.type, "version": task.version, "n_shot": task.few_shot,
              "metrics": {k: metrics[k] for k in task.metrics}, "stderr": {k: stderr[k] for k in task.metrics},
              "baselines": {k: v for k, v in baselines.items() if k in task.metrics},
              "items": len(items), "skipped": data.skipped, "groups": task.groups, "seconds": round(seconds, 3), **extra}
    if log_samples:
        for sample in samples:
            sample["score"] = {k: per_item[k][sample["index"]] for k in task.metrics if k in per_item}
        result["samples"] = samples
    return result


def _task_options(cfg: EvalConfig) -> dict[str, Any]:
    """evaluate_task's settings from the run's config."""
    return {"batch_size": cfg.batch_size, "max_items": cfg.max_items, "bootstrap_iters": cfg.bootstrap_iters,
            "seed": cfg.seed, "log_samples": cfg.log_samples}


def _evaluate_tasks_here(cfg: EvalConfig, tasks: list[TaskConfig], device: str) -> dict[str, dict]:
    from glm.checkpoint import load_inference_checkpoint

    model, tokenizer = load_inference_checkpoint(cfg.checkpoint, device=device)
    return {t.name: evaluate_task(model, tokenizer, t, **_task_options(cfg)) for t in tasks}


def _evaluate_tasks_on_ray(cfg: EvalConfig, tasks: list[TaskConfig], device: str) -> dict[str, dict]:
    import ray

    def one(checkpoint: str, task: TaskConfig, device: str, options: dict[str, Any]) -> dict:
        from glm.checkpoint import load_inference_checkpoint

        model, tokenizer = load_inference_checkpoint(checkpoint, device=device)
        return evaluate_task(model, tokenizer, task, **options)

    remote = ray.remote(one).options(num_cpus=cfg.cpus_per_task, num_gpus=1 if device.startswith("cuda") else 0)
    refs = {t.name: remote.remote(cfg.checkpoint, t, device, _task_options(cfg)) for t in tasks}
    _log(f"{len(refs)} tasks submitted to Ray")
    return dict(zip(refs, ray.get(list(refs.values()))))


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` on `cfg.tasks`; returns the report (its URI under "report_uri")."""
    from glm.checkpoint import read_checkpoint_config

    started, start = time.time(), time.perf_counter()
    cfg.checkpoint = storage.checkpoint(cfg.checkpoint)
    cfg.output = report_uri(storage.absolute(cfg.output), cfg.run_name, started)
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
        flat.update({f"{name}/{k}_stderr": v for name, r in {**results, **group_results}.items()
                     for k, v in r["stderr"].items() if v is not None})
        samples = [sample for r in results.values() for sample in r.pop("samples", [])]
        report = {"checkpoint": cfg.checkpoint, "checkpoint_metadata": metadata, "tasks": results,
                  "groups": group_results, "metrics": flat, "seconds": round(time.perf_counter() - start, 3),
                  "report_uri": cfg.output, "mlflow_run_id": tracker.run_id,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "table_uri": beside(cfg.output, TABLE_SUFFIX), "bootstrap_iters": cfg.bootstrap_iters, "seed": cfg.seed}
        if cfg.log_samples:
            report["samples_uri"] = beside(cfg.output, SAMPLES_SUFFIX)
            write_text(report["samples_uri"], jsonl(samples))
        results_table = table(report)
        write_text(report["table_uri"], results_table)
        write_text(cfg.output, json_text(report))
        tracker.log_metrics(flat)
        tracker.set_tags({"checkpoint": cfg.checkpoint, "checkpoint_stage": str(metadata.get("stage", "")),
                          "report": cfg.output})
        tracker.log_dict(report, "eval_report.json")
        tracker.log_text(results_table, "eval_report.md")
        if cfg.log_samples:
            tracker.log_text(jsonl(samples), "eval_samples.jsonl")
    _log(f"report written to {cfg.output}")
    return report

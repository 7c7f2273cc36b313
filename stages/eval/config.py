"""Typed configs of the evaluation stage: one TaskConfig per task YAML, one EvalConfig per run."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from glm.config import ConfigError
from glm.generation import GenerationConfig
from stages.tracking import TrackingConfig

TaskType = Literal["multiple_choice", "generation", "language_modeling"]

# Metrics each task type can compute; the first ones are the defaults.
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("accuracy", "accuracy_norm"),
    "generation": ("exact_match", "f1"),
    "language_modeling": ("perplexity", "bits_per_byte", "last_word_accuracy"),
}


@dataclass
class TaskConfig:
    """One evaluation task (a YAML file in stages/eval/tasks/), GLM-130B style."""

    name: str
    """Task name: metrics are logged as `<name>/<metric>`."""
    type: TaskType
    """multiple_choice, generation or language_modeling."""
    data: str
    """Data file, directory or URI; relative paths are taken from the repo root."""
    file_pattern: str = "*.jsonl"
    """Files of `data` to read when it is a directory (glob on the file name)."""
    format: str = "glm"
    """Row adapter: `glm` (inputs_pretokenized, choices_pretokenized, label, targets_pretokenized,
    text) or a native format of the shared eval sets (see stages/eval/adapters.py)."""
    where: dict[str, list[str]] = field(default_factory=dict)
    """Keep only rows whose native field has one of the listed values, e.g. {subject: [anatomy]}."""
    metrics: list[str] = field(default_factory=list)
    """Metrics to report (default: all of the type's; see METRICS)."""
    groups: list[str] = field(default_factory=list)
    """Groups this task counts towards (e.g. [mmlu, en]); groups report item-weighted means."""
    mask: Literal["[MASK]", "[gMASK]"] = "[MASK]"
    """Mask token after the context: Part B (the answer) fills it, as in training."""
    max_length: int = 512
    """Longest sequence scored (also capped at the model's max_seq_len); contexts are cut from the left."""
    version: int = 1
    """Task version, reported beside its metrics: raise it when a change (prompt, data, scoring)
    makes its numbers incomparable with earlier reports."""
    few_shot: int = 0
    """Solved examples put before each item (from `few_shot_data`, in file order); the report's n-shot."""
    few_shot_data: str = ""
    """Data file of the few-shot examples (same format and `where` filter as `data`)."""
    few_shot_match: str = ""
    """Native field whose value a few-shot example must share with the item (e.g. subject)."""
    max_items: int = 0
    """Score only the first N items (0 = all)."""
    stride: int = 0
    """Perplexity: tokens newly scored per window (0 = half of max_length); the rest is context."""
    normalization: Literal["squad", "chinese"] = "squad"
    """Generation answers: SQuAD normalisation on words, or Chinese on characters (CMRC 2018)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    """Decoding settings of generation tasks (greedy by default; num_beams > 1 for beam search)."""

    def __post_init__(self) -> None:
        allowed = METRICS[self.type]
        unknown = [m for m in self.metrics if m not in allowed]
        if unknown:
            raise ConfigError(f"task {self.name!r}: metric(s) {unknown} not available for {self.type}; known: {list(allowed)}")
        if not self.metrics:
            self.metrics = list(allowed[:2])
        if self.max_length < 8:
            raise ConfigError(f"task {self.name!r}: max_length must be >= 8, got {self.max_length}")
        if self.few_shot < 0 or self.max_items < 0 or self.stride < 0:
            raise ConfigError(f"task {self.name!r}: few_shot, max_items and stride must be >= 0")
        if self.few_shot and not self.few_shot_data:
            raise ConfigError(f"task {self.name!r}: few_shot {self.few_shot} needs few_shot_data")
        if self.stride >= self.max_length - 2:
            raise ConfigError(f"task {self.name!r}: stride {self.stride} leaves no room in max_length {self.max_length}")


OUTPUT_FIELDS = ("run_name", "time")
"""Placeholders of EvalConfig.output."""


@dataclass
class EvalConfig:
    """Score an inference checkpoint on task YAMLs (`python -m stages.eval`)."""

    checkpoint: str
    """Inference checkpoint directory or URI (FP or quantized; glm.checkpoint loads it)."""
    tasks: list[str] = field(default_factory=lambda: ["stages/eval/tasks"])
    """Task YAML files or directories (searched recursively for *.yaml)."""
    output: str = "runs/eval/{run_name}-{time}.json"
    """Where the JSON report is written (path or URI); `{run_name}` and `{time}` (UTC start,
    20250101T120000Z) are filled in, so each run writes its own report. Beside it go the table
    (`.md`) and, with `log_samples`, the per-item log (`.samples.jsonl`)."""
    log_samples: bool = False
    """Also write every item's prompt, target, prediction and scores as JSONL beside the report."""
    bootstrap_iters: int = 1000
    """Resamples for the bootstrap standard errors (f1, perplexity, bits per byte); 0 = none."""
    seed: int = 1234
    """Seed of the bootstrap resampling (the same items give the same errors)."""
    batch_size: int = 16
    """Items per forward pass (multiple choice, generation) or windows (perplexity)."""
    max_items: int = 0
    """Cap every task at N items (0 = each task's own max_items)."""
    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1 ..."""
    parallel: Literal["auto", "ray", "local"] = "auto"
    """auto: tasks as parallel Ray tasks when Ray is up in this process, else one by one here."""
    cpus_per_task: float = 1.0
    """Ray: logical CPUs per task (GPUs: one per task when device is cuda)."""
    run_name: str = "eval"
    """MLflow run name (a pipeline names each evaluation after the stage it follows, e.g. eval-sft)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.tasks:
            raise ConfigError("tasks: name at least one task YAML file or directory")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"bootstrap_iters must be >= 0, got {self.bootstrap_iters}")
        try:
            unknown = {f for _, f, _, _ in string.Formatter().parse(self.output) if f is not None} - set(OUTPUT_FIELDS)
        except ValueError as e:  # an unmatched brace
            raise ConfigError(f"output {self.output!r}: {e}") from None
        if unknown:
            raise ConfigError(f"output {self.output!r}: unknown placeholder(s) {sorted(unknown)}; known: {list(OUTPUT_FIELDS)}")

"""What each stage did, measured: a small JSON file beside a stage's output
(`<output>_effects.json`), its numbers also logged as `effect.*` metrics of the stage's MLflow
run. The pipeline prints them in its summary (`pipelines/effects.py`).

Training stages measure in their export function, which the engine calls on rank 0 after the
last validation while the stage's MLflow run is still open: "before" and "after" are the first
and last values of the engine's validation metrics (`validate_at_start: true` gives step 0).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from stages import storage
from stages.tracking import json_text, log_json


def effects_path(output: str) -> str:
    return output.rstrip("/") + "_effects.json"


def write_effects(output: str, effects: dict[str, Any]) -> None:
    fs, path = storage.resolve(effects_path(output))
    storage.write_bytes(fs, path, json_text(effects).encode("utf-8"))


def read_effects(output: str) -> dict[str, Any] | None:
    fs, path = storage.resolve(effects_path(output))
    return json.loads(storage.read_bytes(fs, path)) if storage.exists(fs, path) else None


def log_effect_metrics(effects: dict[str, Any]) -> None:
    """The numeric effects as `effect.<name>` metrics of the active MLflow run (if any)."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return
    mlflow.log_metrics({f"effect.{k}": float(v) for k, v in effects.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    log_json(mlflow, effects, "effects.json")


def validation_before_after(names: list[str]) -> dict[str, float]:
    """{name_before, name_after} from the active MLflow run's history of each validation metric."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return {}
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    out = {}
    for name in names:
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        if history and history[0].step == 0:  # validate_at_start: the model before training
            out[f"{name}_before"] = history[0].value
        if history and history[-1].step > 0:
            out[f"{name}_after"], out[f"{name}_after_step"] = history[-1].value, history[-1].step
    return out


def export_with_effects(model, export: Callable[[Any], dict | None], output: str, stage: str,
                        validation: list[str], samples_artifact: str = "", measures_artifact: str = "") -> dict | None:
    """The stage's export, then its effect: validation metrics before / after training (and the
    export's sample answers, and the measures of its artifact `measures_artifact`, a flat dict
    such as the reward model's held-out accuracy per family), written beside the output and
    logged to MLflow."""
    artifacts = export(model) or {}
    effects: dict[str, Any] = {"stage": stage, **validation_before_after(validation),
                               **artifacts.get(measures_artifact, {})}
    if samples_artifact and samples_artifact in artifacts:
        effects["samples"] = artifacts[samples_artifact]
    write_effects(output, effects)
    log_effect_metrics(effects)
    return artifacts

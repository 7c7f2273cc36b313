"""MLflow tracking shared by the stages: one run per stage, nested under a pipeline run if one is
active (in this process, or the one a pipeline's Ray task runs for).

Default store: MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory
(the old ./mlruns file store is refused by MLflow 3.x). mlflow is imported only when tracking
is on.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = False
    """Log params, counts and the manifest to MLflow."""
    experiment: str = "glm-pipeline"
    tracking_uri: str = ""
    """Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""


PARENT_RUN_ENV = "GLM_MLFLOW_PARENT_RUN_ID"
"""A pipeline run's id, set while a stage runs in a Ray task of the pipeline (another process)."""


def active_run_id() -> str:
    """The MLflow run active in this process (a pipeline's parent run), else the pipeline run a
    Ray task of the pipeline runs for ($GLM_MLFLOW_PARENT_RUN_ID), or ""; never imports mlflow."""
    import sys

    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run else os.environ.get(PARENT_RUN_ENV, "")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's UI opens an experiment on its GenAI trace view unless this tag says otherwise."""


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for any other store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):])


def use_experiment(mlflow, name: str, tracking_uri: str) -> None:
    """Make `name` the active experiment, creating it when missing: for a SQLite store with its
    artifacts in `mlruns/` beside the database file (MLflow's default is `./mlruns` of whatever
    directory the creating process runs in: a Ray job's temporary working directory, lost with
    the cluster), and tagged as a model-development experiment so the UI opens on its runs."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        db = sqlite_path(tracking_uri)
        location = (db.parent / "mlruns").resolve().as_uri() if db is not None else None
        try:
            mlflow.create_experiment(name, artifact_location=location,
                                     tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process of the run
            pass
    elif EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                                 "custom_model_development")
    mlflow.set_experiment(name)


def json_text(data: Any) -> str:
    """JSON for a file or an MLflow artifact: indented, UTF-8 text with Chinese (any non-ASCII)
    as is, not \\u-escaped, so it reads in the MLflow UI; what JSON cannot hold as its str()."""
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def log_json(mlflow, data: Any, name: str) -> None:
    """`mlflow.log_dict` as readable UTF-8 (log_dict escapes every non-ASCII character)."""
    mlflow.log_text(json_text(data), name)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists as flat 'a.b.0.c' keys (MLflow params are flat)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


class StageRun:
    """Handle given to a stage while its MLflow run is open; every method is a no-op when disabled."""

    def __init__(self, mlflow=None, run=None):
        self._mlflow, self.run = mlflow, run

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, data: dict, name: str) -> None:
        if self._mlflow:
            log_json(self._mlflow, data, name)

    def log_text(self, text: str, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_text(text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow:
            self._mlflow.set_tags(tags)

    def log_dataset(self, uri: str, name: str, digest: str, context: str) -> None:
        if self._mlflow:
            log_dataset(self._mlflow, uri, name, digest, context)


def log_dataset(mlflow, uri: str, name: str, digest: str, context: str) -> None:
    """Record the data stage's output at `uri` as an input of the active run (the runs table's
    Dataset column and the run's lineage in the MLflow UI): `context` "output" for the run that
    built it, "training" for runs that train on it."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path or an object store
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    mlflow.log_input(MetaDataset(source, name=name, digest=digest[:36]), context=context)


@contextlib.contextmanager
def stage_run(enabled: bool, stage: str, params: dict[str, Any], experiment: str = "glm-pipeline",
              tracking_uri: str = "") -> Iterator[StageRun]:
    """Open an MLflow run for a stage (nested when a pipeline run is active) and log its params."""
    if not enabled:
        yield StageRun()
        return
    import mlflow

    tracking_uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.active_run() is None:
        use_experiment(mlflow, experiment, tracking_uri)
    parent = active_run_id()
    tags = {"mlflow.parentRunId": parent} if parent and mlflow.active_run() is None else None
    with mlflow.start_run(run_name=stage, nested=mlflow.active_run() is not None, tags=tags) as run:
        params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(params).items()}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.set_tag("stage", stage)
        yield StageRun(mlflow, run)


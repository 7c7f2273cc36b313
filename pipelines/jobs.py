"""The pipeline as a Ray job (`ray job submit --working-dir . -- python pipelines/full.py ...`).

A job's driver runs in a temporary copy of the submitted directory on the head node, which Ray
deletes later. A relative output directory or a local MLflow store resolved there would vanish
with it (and the MLflow UI of the submitting directory would never see the runs). So inside a
job a relative `work_dir` and the default or a relative `sqlite:///` tracking store are taken
relative to $GLM_JOB_BASE_DIR (`make cluster-up` sets it to the checkout that started the head),
and refused with a message saying what to set when it is not there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from glm.config import ConfigError
from pipelines.config import PipelineConfig
from stages.tracking import sqlite_path

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the entrypoint process of a submitted job."""
BASE_DIR_ENV = "GLM_JOB_BASE_DIR"


def submission_id() -> str | None:
    """The Ray job submission id when this process is a submitted job's entrypoint, else None."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or "unknown"
    except ValueError:
        return "unknown"


def _remedy(what: str) -> str:
    return (f"set {what}, or submit to a head started with `make cluster-up`, which sets {BASE_DIR_ENV} to its "
            f"checkout (or pass --runtime-env-json '{{\"env_vars\": {{\"{BASE_DIR_ENV}\": \"/abs/dir\"}}}}')")


def place_job_outputs(p: PipelineConfig) -> None:
    """Inside a Ray job: make `work_dir` and the tracking URI outlive the job's working
    directory (see the module docstring); ConfigError when they cannot. Outside a job: nothing."""
    job = submission_id()
    if job is None:
        return
    cwd, base = Path.cwd().resolve(), os.environ.get(BASE_DIR_ENV, "")
    where = f"inside Ray job {job}, whose working directory {cwd} is deleted with the cluster"
    if "://" not in p.work_dir and not Path(p.work_dir).is_absolute():
        if not base:
            raise ConfigError(f"work_dir {p.work_dir!r} is relative {where}: "
                              + _remedy("work_dir to an absolute path or URI (--set work_dir=s3://bucket/runs/{name})"))
        p.work_dir = str(Path(base) / p.work_dir)
    if not p.tracking.enabled:
        return
    uri = p.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        if not base:
            raise ConfigError(f"no MLflow tracking URI {where} (the default sqlite:///mlflow.db would be written "
                              "there): " + _remedy("MLFLOW_TRACKING_URI in the job's runtime env or tracking.tracking_uri"))
        uri = f"sqlite:///{Path(base) / 'mlflow.db'}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        if not base:
            raise ConfigError(f"MLflow tracking URI {uri} is relative {where}: "
                              + _remedy("an absolute sqlite:////path/mlflow.db or a tracking server URL"))
        uri = f"sqlite:///{Path(base) / db}"
    elif db is not None and db.resolve().is_relative_to(cwd):
        raise ConfigError(f"MLflow tracking URI {uri} is {where}: use a database outside it")
    p.tracking.tracking_uri = uri
    print(f"Ray job {job}: outputs under {p.work_dir}, MLflow at {uri}", flush=True)

"""Where a Ray job's outputs and MLflow store go (pipelines/jobs.py), without a cluster."""

import json

import pytest


def test_a_job_without_a_base_directory_refuses_a_relative_work_dir(monkeypatch, tmp_path):
    """Inside a job (Ray's job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR) a relative output or
    tracking location would be written into the job's temporary working directory: refused,
    naming what to set."""
    from glm.config import ConfigError
    from pipelines.config import PipelineConfig
    from pipelines.jobs import place_job_outputs
    from stages.tracking import TrackingConfig

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_x"}}))
    monkeypatch.delenv("GLM_JOB_BASE_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="work_dir 'runs/{name}' is relative inside Ray job raysubmit_x"):
        place_job_outputs(PipelineConfig(name="x"))
    with pytest.raises(ConfigError, match="no MLflow tracking URI inside Ray job raysubmit_x.*MLFLOW_TRACKING_URI"):
        place_job_outputs(PipelineConfig(name="x", work_dir="/abs/runs", tracking=TrackingConfig(enabled=True)))
    p = PipelineConfig(name="x", work_dir="s3://b/runs", tracking=TrackingConfig(enabled=True, tracking_uri="http://mlflow:5000"))
    place_job_outputs(p)  # absolute places are taken as they are
    assert (p.work_dir, p.tracking.tracking_uri) == ("s3://b/runs", "http://mlflow:5000")



def test_a_job_with_a_base_directory_writes_there(monkeypatch, tmp_path):
    from pipelines.config import PipelineConfig
    from pipelines.jobs import place_job_outputs
    from stages.tracking import TrackingConfig

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_y"}}))
    monkeypatch.setenv("GLM_JOB_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = PipelineConfig(name="x", tracking=TrackingConfig(enabled=True, tracking_uri="sqlite:///rel.db"))
    place_job_outputs(p)
    assert p.work_dir == str(tmp_path / "runs/{name}") and p.tracking.tracking_uri == f"sqlite:///{tmp_path / 'rel.db'}"
    monkeypatch.chdir(tmp_path)
    inside = PipelineConfig(name="x", work_dir="/abs", tracking=TrackingConfig(
        enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'sub/mlflow.db'}"))
    with pytest.raises(Exception, match="use a database outside it"):
        place_job_outputs(inside)


def test_outside_a_job_nothing_changes(monkeypatch):
    from pipelines.config import PipelineConfig
    from pipelines.jobs import place_job_outputs

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    p = PipelineConfig(name="x")
    place_job_outputs(p)
    assert p.work_dir == "runs/{name}"

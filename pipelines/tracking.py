"""The pipeline's MLflow parent run: stages open nested runs under it; it carries each stage's
duration and outputs, the check answers and the registered final model."""

from __future__ import annotations

from dataclasses import asdict

from pipelines.config import PipelineConfig
from stages.tracking import default_tracking_uri, log_json


class PipelineRun:
    """The parent MLflow run of one pipeline run (a no-op when tracking is off)."""

    def __init__(self, p: PipelineConfig):
        self.p, self.mlflow, self.run = p, None, None
        if not p.tracking.enabled:
            return
        import mlflow

        mlflow.set_tracking_uri(p.tracking.tracking_uri or default_tracking_uri())
        mlflow.set_experiment(p.tracking.experiment)
        self.run = mlflow.start_run(run_name=p.name, tags={"pipeline": p.name, "work_dir": p.work_dir})
        mlflow.log_params({"stages": ",".join(p.stages), "work_dir": p.work_dir})
        log_json(mlflow, asdict(p), "pipeline_config.json")
        self.mlflow = mlflow

    def stage_done(self, stage: str, outputs: dict, seconds: float) -> None:
        if self.mlflow:
            self.mlflow.log_metric(f"{stage}.seconds", seconds)
            self.mlflow.set_tags({f"{stage}.{k}": v for k, v in outputs.items()})

    def stage_runs(self, stage: str, runs: dict[str, str]) -> None:
        """The engine runs a stage trains in (label -> run name, keyed by its config hash)."""
        if self.mlflow and runs:
            self.mlflow.set_tags({f"{stage}.run.{label}": run for label, run in runs.items()})

    def stage_skipped(self, stage: str, marker: dict) -> None:
        if self.mlflow:
            self.mlflow.set_tags({f"{stage}.skipped": "complete output reused",
                                  **{f"{stage}.{k}": v for k, v in marker["outputs"].items()}})

    def register(self, model_uri: str) -> None:
        """Register the final checkpoint by reference (no copy of the weights): a new version
        per pipeline run, the alias moved to it."""
        if not (self.mlflow and self.p.registry.name):
            return
        client = self.mlflow.MlflowClient()
        name = self.p.registry.name
        try:
            client.get_registered_model(name)
        except self.mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="GLM chat model trained by pipelines/full.py")
        version = client.create_model_version(name, source=model_uri, run_id=self.run.info.run_id,
                                              tags={"pipeline": self.p.name})
        client.set_registered_model_alias(name, self.p.registry.alias, version.version)
        self.mlflow.set_tag("registered_model", f"models:/{name}/{version.version}")
        print(f"registered {model_uri} as models:/{name}/{version.version} (alias @{self.p.registry.alias})",
              flush=True)

    def log_check(self, answers: dict[str, str]) -> None:
        if self.mlflow:
            log_json(self.mlflow, answers, "check_requests.json")

    def finish(self, status: str) -> None:
        if self.mlflow and self.mlflow.active_run():
            self.mlflow.end_run(status=status)

"""The pipeline's MLflow parent run: stages open nested runs under it; it carries each stage's
duration and outputs, the check answers and the registered final model."""

from __future__ import annotations

from dataclasses import asdict

from pipelines.config import PipelineConfig
from stages.tracking import default_tracking_uri, log_json, use_experiment


class PipelineRun:
    """The parent MLflow run of one pipeline run (a no-op when tracking is off)."""

    def __init__(self, p: PipelineConfig):
        self.p, self.mlflow, self.run = p, None, None
        if not p.tracking.enabled:
            return
        import mlflow

        uri = p.tracking.tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(uri)
        use_experiment(mlflow, p.tracking.experiment, uri)
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

    def register(self, model_uri: str, metrics: dict[str, float] | None = None, data_uri: str = "") -> None:
        """Register the final checkpoint as an MLflow Model (the `glm.pyfunc` chat flavour, its
        files as artifacts unless `registry.copy_weights` is off) with the final evaluation's
        metrics, the data manifest and the config linked, and move the alias to it. Weights
        already registered (same SHA-256) get no new version: the alias moves to that one."""
        if not (self.mlflow and self.p.registry.name):
            return
        from glm.checkpoint import read_checkpoint_config, weights_sha256

        mlflow, client, name = self.mlflow, self.mlflow.MlflowClient(), self.p.registry.name
        sha = weights_sha256(model_uri)
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if metrics:
            mlflow.log_metrics({f"final.{k.replace('/', '.')}": v for k, v in metrics.items()})
        manifest = _data_manifest(data_uri)
        if manifest is not None:
            log_json(mlflow, manifest, "data/manifest.json")
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="GLM chat models trained by pipelines/full.py",
                                           tags={"task": "chat"})
        same = [v for v in client.search_model_versions(f"name='{name}'") if sha and v.tags.get("weights_sha256") == sha]
        if same:
            version = max(same, key=lambda v: int(v.version))
            print(f"model {model_uri}: weights unchanged (sha256 {sha[:12]}...), already models:/{name}/{version.version}",
                  flush=True)
        else:
            config, _ = read_checkpoint_config(model_uri)
            if self.p.registry.copy_weights:
                from glm.pyfunc import log_chat_model

                info = log_chat_model(model_uri)
                source = info.model_uri
            else:
                source = model_uri
            run_uri = f"runs:/{self.run.info.run_id}"
            tags = {"pipeline": self.p.name, "weights_sha256": sha, "checkpoint": model_uri,
                    "config": f"{run_uri}/pipeline_config.json",
                    **({"data_manifest": f"{run_uri}/data/manifest.json"} if manifest is not None else {}),
                    **{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()}}
            version = client.create_model_version(name, source=source, run_id=self.run.info.run_id, tags=tags,
                                                  description=_describe(self.p, config, metrics, model_uri))
        client.set_registered_model_alias(name, self.p.registry.alias, version.version)
        mlflow.set_tag("registered_model", f"models:/{name}/{version.version}")
        print(f"registered {model_uri} as models:/{name}/{version.version} (alias @{self.p.registry.alias}); "
              f"load it with mlflow.pyfunc.load_model('models:/{name}@{self.p.registry.alias}')", flush=True)

    def log_check(self, answers: dict[str, str]) -> None:
        if self.mlflow:
            log_json(self.mlflow, answers, "check_requests.json")

    def finish(self, status: str) -> None:
        if self.mlflow and self.mlflow.active_run():
            self.mlflow.end_run(status=status)


def _data_manifest(data_uri: str) -> dict | None:
    """The data stage's manifest (None when the pipeline has no data stage output)."""
    if not data_uri:
        return None
    import json
    import posixpath

    from stages import storage
    from stages.data.stage import MANIFEST

    fs, path = storage.resolve(data_uri)
    try:
        return json.loads(storage.read_bytes(fs, posixpath.join(path, MANIFEST)))
    except FileNotFoundError:
        return None


def _describe(p: PipelineConfig, config, metrics: dict[str, float], model_uri: str) -> str:
    """The model version's description: what it is, how it was made, how it scored."""
    shape = f"{config.num_layers} layers x {config.hidden_size}, {config.num_heads} heads, vocab {config.vocab_size}"
    from glm.checkpoint import read_checkpoint_quantization

    spec = read_checkpoint_quantization(model_uri)
    quantized = f"INT{spec.bits}, groups of {spec.group_size}" if spec is not None else ""
    lines = [f"GLM chat model from pipeline `{p.name}` (stages: {', '.join(p.stages)}).",
             f"Architecture: {shape}, {config.position_encoding}, {config.ffn_type}."
             + (f" Quantized: {quantized}." if quantized else ""),
             f"Checkpoint: {model_uri}"]
    if metrics:
        lines.append("Final evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())
                                                     if not k.endswith("/items")))
    lines.append("Use: mlflow.pyfunc.load_model(uri).predict([{'messages': [{'role': 'user', 'content': '你好'}]}]); "
                 "python -m stages.serve --checkpoint models:/NAME@ALIAS")
    return "\n".join(lines)

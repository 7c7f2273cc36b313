"""Checkpoints named by MLflow URIs: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/m-ID`
(a logged model) and `runs:/RUN_ID/PATH`. Everything that opens an inference checkpoint
(`glm.checkpoint`) accepts them: the model's files are downloaded once into a local cache and
the checkpoint directory inside is opened (the `checkpoint` artifact of an MLflow Model logged by
`glm.pyfunc`, as its MLmodel file says; a run artifact may also be a plain checkpoint directory).

Tracking server: mlflow's current one (set in this process, else MLFLOW_TRACKING_URI, else
`sqlite:///mlflow.db` in the working directory, as the pipeline's default). Cache: $GLM_MODEL_CACHE, else ~/.cache/glm/models. mlflow is imported only
for such URIs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

SCHEMES = ("models:/", "runs:/")
DONE = ".complete"


def is_mlflow_uri(uri: str | Path) -> bool:
    return str(uri).startswith(SCHEMES)


def _cache_key(uri: str) -> str:
    """A stable cache folder for `uri`: an alias resolves to its version, so moving the alias
    to a new version downloads the new one."""
    import mlflow

    if uri.startswith("runs:/"):
        return "runs/" + uri[len("runs:/"):].strip("/")
    name = uri[len("models:/"):].strip("/")
    client = mlflow.MlflowClient()
    if "@" in name:
        model, alias = name.split("@", 1)
        return f"{model}/{client.get_model_version_by_alias(model, alias).version}"
    return name  # NAME/VERSION or a logged model id


def local_checkpoint(uri: str) -> str:
    """The local directory of the inference checkpoint that the MLflow URI `uri` names
    (downloaded on first use). FileNotFoundError naming the URI when it holds none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        root = Path(os.environ.get("GLM_MODEL_CACHE", Path.home() / ".cache/glm/models")) / _cache_key(uri)
        if not (root / DONE).exists():
            staging = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
            staging.mkdir(parents=True)
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging)))
                # a run artifact path arrives as <staging>/<its last part>: remember where
                (staging / DONE).write_text(str(got.relative_to(staging)) if got != staging else "")
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except MlflowException as e:
        raise FileNotFoundError(f"{uri}: not found in the MLflow tracking server {mlflow.get_tracking_uri()} "
                                f"({e.message.splitlines()[0]})") from None
    root = root / (root / DONE).read_text().strip()
    for candidate in (root, _pyfunc_checkpoint(root)):
        if candidate is not None and (candidate / "config.json").exists():
            return str(candidate)
    raise FileNotFoundError(f"{uri} holds no inference checkpoint (no config.json at its root, and no "
                            f"`checkpoint` artifact of a glm.pyfunc model; downloaded to {root})")


def _pyfunc_checkpoint(root: Path) -> Path | None:
    """The checkpoint artifact of an MLflow Model logged by `glm.pyfunc.log_chat_model`."""
    import yaml

    if not (root / "MLmodel").exists():
        return None
    flavor = (yaml.safe_load((root / "MLmodel").read_text()).get("flavors") or {}).get("python_function") or {}
    path = ((flavor.get("artifacts") or {}).get("checkpoint") or {}).get("path")
    return root / path if path else None

"""The shipped Serve config file is valid for `serve deploy` and its args are a ServeConfig."""

from pathlib import Path

import pytest
import yaml

from glm.config import ConfigError, from_dict
from stages.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[3]
SERVE_YAML = REPO / "stages/serve/configs/serve.yaml"


def test_serve_config_file_matches_ray_serve_schema_and_our_app():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from stages.serve.app import GLMServer, build_app

    data = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1"  # loopback unless the operator opens it
    [app] = schema.applications
    assert app.import_path == "stages.serve.app:build_app"
    config = from_dict(ServeConfig, app.args, where="serve.yaml args")
    [deployment] = app.deployments
    assert deployment.name == GLMServer.name
    AutoscalingConfig(**deployment.autoscaling_config)  # strict: unknown keys raise
    assert deployment.max_ongoing_requests >= config.max_batch_size + config.max_waiting
    assert build_app(app.args) is not None


def test_serve_config_rejects_unknown_and_invalid_args():
    with pytest.raises(ConfigError, match="max_batch"):
        from_dict(ServeConfig, {"checkpoint": "x", "max_batch": 4}, where="args")
    with pytest.raises((ConfigError, ValueError), match="max_batch_size=0"):
        from_dict(ServeConfig, {"checkpoint": "x", "max_batch_size": 0}, where="args")


@pytest.mark.parametrize("module,forbidden", [
    ("stages.serve", ["torch", "ray", "fastapi"]),  # deploy() imports them when called
    ("stages.serve.engine", ["ray", "fastapi"]),  # runs in-process too (benchmarks)
])
def test_serve_imports_stay_light(module, forbidden):
    import subprocess
    import sys

    code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"

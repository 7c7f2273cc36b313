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
    assert deployment.max_ongoing_requests >= config.max_batch_size + config.max_waiting + 16
    assert build_app(app.args) is not None


def test_serve_config_rejects_unknown_and_invalid_args():
    with pytest.raises(ConfigError, match="max_batch"):
        from_dict(ServeConfig, {"checkpoint": "x", "max_batch": 4}, where="args")
    with pytest.raises((ConfigError, ValueError), match="max_batch_size=0"):
        from_dict(ServeConfig, {"checkpoint": "x", "max_batch_size": 0}, where="args")


def test_exposed_without_a_key_refuses_unless_meant_to_be_open(monkeypatch):
    monkeypatch.delenv("GLM_SERVE_API_KEY", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServeConfig(checkpoint="x", host=host).check_exposure()
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-head-node"):
        with pytest.raises(ValueError, match=f"refusing to serve on '{host}' without an API key"):
            ServeConfig(checkpoint="x", host=host).check_exposure()
        ServeConfig(checkpoint="x", host=host, api_key="k").check_exposure()
        ServeConfig(checkpoint="x", host=host, allow_unauthenticated=True).check_exposure()
    monkeypatch.setenv("GLM_SERVE_API_KEY", "from-env")
    config = ServeConfig(checkpoint="x", host="0.0.0.0")
    config.check_exposure()
    assert config.resolved_api_key() == "from-env"
    with pytest.raises(ValueError, match="max_ongoing_requests must be at least"):
        ServeConfig(max_batch_size=8, max_waiting=64, max_ongoing_requests=72)


@pytest.mark.parametrize("name", ["smoke", "glm_1b", "chatglm_6b", "glm_130b"])
def test_pipeline_serve_sections_are_safe_to_deploy(name, monkeypatch):
    monkeypatch.delenv("GLM_SERVE_API_KEY", raising=False)
    serve = yaml.safe_load((REPO / "pipelines/configs" / f"{name}.yaml").read_text())["serve"] or {}
    from_dict(ServeConfig, {"checkpoint": "x", **serve}, where=name).check_exposure()


def test_tensor_parallel_settings_are_checked_and_placed_on_one_node():
    assert ServeConfig(checkpoint="x").placement_bundles() is None
    config = ServeConfig(checkpoint="x", tensor_parallel=4, num_cpus=8, num_gpus=1)
    assert config.placement_bundles() == [{"CPU": 8}] + [{"CPU": 1, "GPU": 1}] * 4  # the replica, then one per worker
    assert ServeConfig(checkpoint="x", tensor_parallel=2).placement_bundles() == [{"CPU": 1}] * 3
    with pytest.raises(ValueError, match=r"num_gpus=0.5.*per worker: 0 for CPU workers or 1 GPU each"):
        ServeConfig(checkpoint="x", tensor_parallel=2, num_gpus=0.5)
    with pytest.raises(ValueError, match="tensor_parallel=0"):
        ServeConfig(checkpoint="x", tensor_parallel=0)


@pytest.mark.parametrize("name,size,bits", [("chatglm_6b", 2, None), ("glm_130b", 4, 4), ("glm_130b", 8, 8)])
def test_pipeline_tensor_parallel_serving_fits_its_model(name, size, bits):
    """chatglm_6b: fp16 (the SFT model) on 2 GPUs; glm_130b: INT4 on 4 GPUs as shipped, INT8 on
    8 as its comment says. Checked against the model shape, not run (no GPUs in CI)."""
    from glm.config import preset
    from glm.int_quant import QuantSpec
    from stages.serve.tensor_parallel import check_shardable

    data = yaml.safe_load((REPO / "pipelines/configs" / f"{name}.yaml").read_text())
    serve = data["serve"]
    if bits is None:
        assert serve["tensor_parallel"] == size and serve["dtype"] == "float16" and "/sft/" in serve["checkpoint"]
    elif bits == data["quantize"]["bits"]:
        assert serve["tensor_parallel"] == size
    assert serve["num_gpus"] == 1  # per worker
    model = preset(data["pretrain"]["model"]["preset"])
    check_shardable(model, QuantSpec(bits=bits) if bits else None, size, name)


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

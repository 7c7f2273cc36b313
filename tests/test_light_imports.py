"""Light modules stay light: data workers and the model library never pull in Ray / torch needlessly."""

import subprocess
import sys

import pytest

CHECKS = [
    # (module imported, modules that must not be loaded by it)
    ("stages.data.steps", ["torch", "ray", "mlflow", "deepspeed"]),
    ("glm.tokenizer", ["torch", "ray"]),
    ("glm.chat_format", ["torch", "ray"]),
    ("glm.model", ["ray", "mlflow", "deepspeed"]),
    ("glm.generation", ["ray", "mlflow", "deepspeed"]),
    ("kernels.attention", ["ray", "triton"]),
    ("kernels.quant_matmul", ["ray", "triton"]),
    ("glm.quantization", ["ray", "mlflow", "deepspeed", "triton"]),
    ("glm.checkpoint", ["ray", "mlflow", "deepspeed", "triton"]),
    ("glm.parallel", ["ray", "mlflow", "deepspeed", "triton"]),
    ("glm.chatglm_hf", ["ray", "mlflow", "deepspeed", "triton"]),
    ("glm.value_head", ["ray", "mlflow", "deepspeed"]),
    ("stages.rlhf.config", ["torch", "ray", "mlflow", "deepspeed"]),
    ("stages.rlhf.ppo", ["ray", "mlflow", "deepspeed"]),
]


@pytest.mark.parametrize("module,forbidden", CHECKS)
def test_import_does_not_load(module, forbidden):
    code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"

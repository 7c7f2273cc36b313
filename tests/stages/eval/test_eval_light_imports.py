"""The eval stage's modules import Ray, MLflow and lm_eval only inside the functions that use them."""

import subprocess
import sys


def test_eval_modules_stay_light():
    modules = "stages.eval.__main__, stages.eval.stage, stages.eval.tasks, stages.eval.scoring"
    forbidden = ["ray", "mlflow", "lm_eval", "deepspeed"]
    code = f"import sys, {modules}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {modules} loaded {out.strip()}"

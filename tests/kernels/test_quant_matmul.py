"""Quantized matmul dispatch: the reference contract, the Triton kernel's parity with it under
Triton's CPU interpreter (every CI run) and on CUDA (`gpu`), and forcing a path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm.quantization import QuantSpec, quantize_weight
from kernels import quant_matmul as qm

REPO = Path(__file__).resolve().parents[2]

# (bits, group_size, M, N, K): odd sizes, partial tiles and groups, group scales per element and
# per K block (group_size a multiple of BLOCK_K = 128), a K split over several blocks
CASES = [
    (4, 0, 1, 64, 128), (4, 0, 3, 37, 75), (4, 32, 5, 40, 130), (4, 16, 17, 33, 65),
    (4, 128, 3, 20, 300), (8, 0, 2, 64, 256), (8, 16, 17, 33, 65), (8, 64, 1, 19, 300), (8, 128, 2, 24, 260),
]


def make_case(bits, group_size, M, N, K, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    qweight, scales = quantize_weight(w, QuantSpec(bits, group_size))
    x = torch.randn(2, M, K, generator=g).to(dtype)  # a leading batch dim: (..., K) inputs
    bias = torch.randn(N, generator=g).to(dtype)
    return [t.to(device) for t in (x, qweight, scales, bias)]


def test_reference_is_dequantize_then_matmul():
    x, qweight, scales, bias = make_case(4, 32, 5, 40, 130, torch.float64)
    w = qm.dequantize(qweight, scales, bits=4, group_size=32, in_features=130, dtype=torch.float64)
    y = qm.quantized_matmul_reference(x, qweight, scales, bits=4, group_size=32, in_features=130, bias=bias)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float64
    assert torch.allclose(y, x @ w.T + bias)


def test_dispatch_picks_reference_on_cpu_and_can_be_forced(monkeypatch):
    x = torch.zeros(1, 4)
    assert qm.selected_impl(x) == "reference"
    with qm.use_impl("triton"):
        assert qm.selected_impl(x) == "triton"
    monkeypatch.setenv("GLM_QUANT_MATMUL_IMPL", "fast")
    with pytest.raises(ValueError, match="GLM_QUANT_MATMUL_IMPL='fast'"):
        qm.selected_impl(x)
    with pytest.raises(ValueError, match="unknown quantized matmul impl"):
        with qm.use_impl("cuda"):
            pass


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton compiles the kernel,
# and other tests of the session may already have imported triton without it.
INTERPRETER_SCRIPT = """
import json, sys, torch
from kernels import quant_matmul as qm
from tests.kernels.test_quant_matmul import CASES, make_case
from kernels.quant_matmul_triton import wxa16_matmul
errors = []
for dtype in (torch.float32, torch.float16):
    for bits, gs, M, N, K in CASES:
        for split_k in (1, 2):
            x, qweight, scales, bias = make_case(bits, gs, M, N, K, dtype)
            kw = dict(bits=bits, group_size=gs, in_features=K)
            if split_k == 1:
                with qm.use_impl("triton"):  # through the dispatch point
                    y = qm.quantized_matmul(x, qweight, scales, bias=bias, **kw)
            else:
                y = wxa16_matmul(x, qweight, scales, bias=bias, split_k=split_k, **kw)
            ref = qm.quantized_matmul_reference(x.double(), qweight, scales, bias=bias.double(), **kw)
            assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape)
            errors.append([str(dtype), bits, gs, M, N, K, split_k,
                           ((y.double() - ref).abs().max() / ref.abs().max()).item()])
print(json.dumps(errors))
"""


def test_triton_kernel_matches_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 * len(CASES) * 2
    for dtype, *case, rel in errors:
        tol = 1e-5 if dtype == "torch.float32" else 3e-3  # fp16: rounding of the output and of x
        assert rel < tol, f"{dtype} case {case}: relative error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + [(4, 0, 1, 4096, 4096), (4, 128, 16, 1000, 4096), (8, 0, 64, 4096, 1030)],
                         ids=lambda c: "-".join(map(str, c)))
def test_triton_kernel_matches_reference_on_cuda(case, dtype):
    bits, gs, M, N, K = case
    x, qweight, scales, bias = make_case(bits, gs, M, N, K, dtype, device="cuda")
    kw = dict(bits=bits, group_size=gs, in_features=K)
    assert qm.selected_impl(x) == "triton"  # auto picks the kernel on CUDA
    y = qm.quantized_matmul(x, qweight, scales, bias=bias, **kw)
    ref = qm.quantized_matmul_reference(x.float(), qweight, scales, bias=bias.float(), **kw)
    rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert y.dtype == dtype and rel < (2e-2 if dtype == torch.bfloat16 else 3e-3), rel

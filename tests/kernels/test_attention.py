"""Attention dispatch: FP32-softmax scaling, reference vs SDPA parity, forcing a path."""

import pytest
import torch

from glm.config import preset
from glm.model import GLMModel
from glm.schema import attention_mask
from kernels import attention as attn


def rule_mask(B, T):
    seg = torch.ones(B, T, dtype=torch.long)
    seg[:, -2:] = 0
    pre = torch.zeros(B, T, dtype=torch.long)
    pre[:, : T // 2] = 1
    return attention_mask(seg, pre)


def test_fp32_softmax_scaling_survives_fp16_overflow():
    torch.manual_seed(0)
    B, nh, T, hd = 1, 2, 8, 64
    # Large aligned vectors: q.k / sqrt(d) is 5.8e4 .. 8.3e4, beyond fp16's 65504. Keys are
    # spaced so scores differ by thousands: fp16 cannot resolve near-ties at this magnitude
    # anyway; what the trick must guarantee is no overflow.
    q = (90 + torch.randn(B, nh, T, hd)).half()
    k = (80 + 5 * torch.arange(T)[:, None] + torch.randn(B, nh, T, hd)).half()
    v = torch.randn(B, nh, T, hd).half()
    mask = torch.ones(1, 1, T, T, dtype=torch.bool)
    raw = torch.matmul(q.float() / hd ** 0.5, k.float().transpose(-1, -2))
    assert raw.abs().max() > 65504  # these scores do not fit in fp16
    expected = torch.matmul(torch.softmax(raw, -1), v.float())
    naive = attn.attention_reference(q, k, v, mask, fp32_softmax_scaling=False)
    assert not torch.isfinite(naive).all()  # plain fp16 scores overflow
    out = attn.attention_reference(q, k, v, mask, layer_index=69, fp32_softmax_scaling=True)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), expected, atol=2e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_reference_and_sdpa_agree(dtype, tol):
    torch.manual_seed(0)
    B, nh, T, hd = 2, 4, 10, 16
    q, k, v = (torch.randn(B, nh, T, hd, dtype=dtype) for _ in range(3))
    mask = rule_mask(B, T)
    ref = attn.attention_reference(q, k, v, mask, layer_index=3)
    fast = attn.attention_sdpa(q, k, v, mask, layer_index=3)
    assert torch.allclose(ref, fast, atol=tol)


def test_model_logits_agree_across_paths():
    model = GLMModel(preset("tiny")).double().eval()
    x = torch.randint(0, 512, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    seg = torch.ones(2, 12, dtype=torch.long)
    pre = (torch.arange(12) < 5).long().expand(2, 12)
    outs = {}
    for impl in attn.IMPLS:
        with attn.use_impl(impl):
            assert attn.selected_impl() == impl
            with torch.no_grad():
                outs[impl] = model(x, pos, None, seg, pre).logits
    assert torch.allclose(outs["reference"], outs["sdpa"], atol=1e-10)


def test_env_selection_and_bad_value(monkeypatch):
    monkeypatch.setenv("GLM_ATTENTION_IMPL", "reference")
    assert attn.selected_impl() == "reference"
    monkeypatch.setenv("GLM_ATTENTION_IMPL", "magic")
    with pytest.raises(ValueError, match="GLM_ATTENTION_IMPL"):
        attn.selected_impl()

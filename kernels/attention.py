"""Attention with one dispatch point: a pure-torch reference and a PyTorch SDPA path.

The reference implements GLM-130B's FP32-softmax scaling trick exactly: scores are computed
in the input dtype on q / (sqrt(d) * c) with c = layer index + 1, then cast to fp32 and
multiplied back by c before the masked softmax, so fp16 scores never overflow.

SDPA (flash / memory-efficient / math backends chosen by PyTorch) takes the same boolean
mask. Select with the env var GLM_ATTENTION_IMPL (reference | sdpa | auto) or, in tests,
with the `use_impl` context manager.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
import torch.nn.functional as F

IMPLS = ("reference", "sdpa")
_forced: str | None = None


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    layer_index: int = 0,
    fp32_softmax_scaling: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Masked softmax attention.

    q: (B, nh, Tq, hd); k, v: (B, nh, Tk, hd); mask: bool (B or 1, 1, Tq, Tk), True = may attend.
    Returns (B, nh, Tq, hd) in v's dtype.
    """
    hd = q.shape[-1]
    coeff = float(layer_index + 1) if fp32_softmax_scaling else 1.0
    scores = torch.matmul(q / (math.sqrt(hd) * coeff), k.transpose(-1, -2))  # (B, nh, Tq, Tk)
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # at least fp32
    scores = scores.to(softmax_dtype) * coeff
    scores = scores.masked_fill(~mask, torch.finfo(softmax_dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    layer_index: int = 0,
    fp32_softmax_scaling: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as `attention_reference`, through torch's fused SDPA kernels.

    The fused kernels keep the softmax accumulation in fp32 internally, which is what the
    scaling trick protects in the reference path; layer_index is accepted for signature parity.
    """
    del layer_index, fp32_softmax_scaling
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def selected_impl() -> str:
    impl = _forced or os.environ.get("GLM_ATTENTION_IMPL", "auto")
    if impl == "auto":
        return "sdpa"
    if impl not in IMPLS:
        raise ValueError(f"GLM_ATTENTION_IMPL={impl!r}: expected one of {IMPLS + ('auto',)}")
    return impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Force an attention implementation inside the block (tests, parity checks)."""
    global _forced
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    previous, _forced = _forced, impl
    try:
        yield
    finally:
        _forced = previous


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    layer_index: int = 0,
    fp32_softmax_scaling: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The dispatch point used by the model. See `attention_reference` for the contract."""
    fn = attention_sdpa if selected_impl() == "sdpa" else attention_reference
    return fn(
        q, k, v, mask, layer_index=layer_index,
        fp32_softmax_scaling=fp32_softmax_scaling, dropout_p=dropout_p,
    )

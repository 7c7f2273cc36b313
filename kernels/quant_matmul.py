"""Weight-only quantized matmul (W8A16 / W4A16) with one dispatch point.

Weights are symmetric integers with half-precision scales (GLM_SPEC.md section 4):

    qweight  int8 (N, K) for 8 bits, or int8 (N, ceil(K / 2)) for 4 bits: two values per
             byte, even column in the high nibble, sign-extended on unpack; an odd K is
             padded with a zero nibble
    scales   fp16 (N, G): one scale per output row (G = 1) or per row and group of
             `group_size` input columns (G = ceil(K / group_size))

`quantized_matmul(x, qweight, scales, bits=..., group_size=..., in_features=..., bias=...)`
computes `x @ (q * s).T + bias` in x's dtype. Two implementations share that signature:

- `reference`: dequantize in torch, then `F.linear` (any device; the CPU path);
- `triton`: a Triton kernel (`kernels.quant_matmul_triton`) that reads the packed integers
  and dequantizes tile by tile in registers, so only a quarter (INT4) or half (INT8) of the
  fp16 weight bytes cross memory. Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests).

Select with GLM_QUANT_MATMUL_IMPL (reference | triton | auto) or, in tests, the `use_impl`
context manager. `auto` picks triton for CUDA inputs when triton is importable, else the
reference. Triton is imported only when its path runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch
import torch.nn.functional as F

IMPLS = ("reference", "triton")
_forced: str | None = None


# --- packing and dequantization (pure torch) ----------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7] of shape (N, K) into int8 (N, ceil(K/2)), even column high."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.int16)
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))  # zero nibble for an odd column count
    high, low = q[:, 0::2], q[:, 1::2]
    packed = ((high & 0xF) << 4) | (low & 0xF)  # 0..255
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 (N, ceil(K/2)) -> int8 (N, K) with values in [-8, 7]."""
    p = packed.to(torch.int16)
    high = p >> 4  # arithmetic shift of a sign-extended byte: the high nibble, signed
    low = ((p & 0xF) ^ 8) - 8  # sign-extend the low nibble
    q = torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1)  # (N, 2 * ceil(K/2))
    return q[:, :in_features].to(torch.int8)


def expand_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Scales (N, G) -> (N, K) or (N, 1): one per weight column for group-wise scales."""
    if scales.shape[1] == 1:
        return scales
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int, in_features: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The (N, K) weight in `dtype`: integers times their scales."""
    q = unpack_int4(qweight, in_features) if bits == 4 else qweight
    return q.to(dtype) * expand_scales(scales, group_size, in_features).to(dtype)


# --- the two implementations ---------------------------------------------------------------


def quantized_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
    in_features: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) times the dequantized weight (N, K) transposed, plus bias: (..., N) in x's dtype."""
    w = dequantize(qweight, scales, bits=bits, group_size=group_size, in_features=in_features, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def quantized_matmul_triton(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
    in_features: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `quantized_matmul_reference`, through the Triton kernel."""
    from kernels.quant_matmul_triton import wxa16_matmul

    return wxa16_matmul(x, qweight, scales, bits=bits, group_size=group_size, in_features=in_features, bias=bias)


# --- dispatch -------------------------------------------------------------------------------


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (an optional, GPU-oriented dependency); does not import it."""
    return importlib.util.find_spec("triton") is not None


def selected_impl(x: torch.Tensor) -> str:
    """The implementation used for input `x` (forced > env var > auto)."""
    impl = _forced or os.environ.get("GLM_QUANT_MATMUL_IMPL", "auto")
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    if impl not in IMPLS:
        raise ValueError(f"GLM_QUANT_MATMUL_IMPL={impl!r}: expected one of {IMPLS + ('auto',)}")
    return impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Force a quantized-matmul implementation inside the block (tests, benchmarks)."""
    global _forced
    if impl not in IMPLS:
        raise ValueError(f"unknown quantized matmul impl {impl!r}; expected one of {IMPLS}")
    previous, _forced = _forced, impl
    try:
        yield
    finally:
        _forced = previous


def quantized_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
    in_features: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dispatch point used by `glm.quantization.QuantizedLinear`; see the module docstring."""
    if bits not in (4, 8):
        raise ValueError(f"quantized_matmul: bits must be 4 or 8, got {bits}")
    fn = quantized_matmul_triton if selected_impl(x) == "triton" else quantized_matmul_reference
    return fn(x, qweight, scales, bits=bits, group_size=group_size, in_features=in_features, bias=bias)

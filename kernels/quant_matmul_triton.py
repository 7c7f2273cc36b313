"""Triton kernel for weight-only quantized matmul: INT4 (two per byte) or INT8 weights,
fp16 / bf16 activations (W4A16 / W8A16), per-row or group-wise fp16 scales.

Imported only by `kernels.quant_matmul` when the triton path runs (it imports triton at the
top). Contract and storage layout: see `kernels.quant_matmul`.

Each program computes a (BLOCK_M, BLOCK_N) tile of y = x @ W.T, walking K in BLOCK_K steps:
it loads the packed integers of a (BLOCK_N, BLOCK_K) weight tile contiguously, unpacks the
nibbles with shifts in int32, scales them (group-wise: per tile row or element; per-row:
once on the fp32 accumulator at the end) and feeds tl.dot. For small batches (decoding)
there are few output tiles, so K is split across SPLIT_K programs that add their partial
sums atomically in fp32: a batch-1 matmul is bound by reading the weights, and all SMs must
be reading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_scales(s_ptr, offs_n, n_ok, offs_k, k_ok, k0, stride_sn, GROUP_SIZE: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Scales for a weight tile's columns `offs_k`: one per row when the whole K block lies in
    one group (BLOCK_N, 1), else one per element (BLOCK_N, len(offs_k))."""
    if GROUP_SIZE % BLOCK_K == 0:
        return tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP_SIZE, mask=n_ok, other=0.0)[:, None]
    return tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_k[None, :] // GROUP_SIZE,
                   mask=n_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _wxa16_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # this program's share of K
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(k_begin + k_chunk, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(k_begin, k_end, BLOCK_K):
        if BITS == 4:
            # Byte j of a row holds columns 2j (high nibble) and 2j+1 (low nibble). Load the
            # packed tile contiguously, split it into the even and odd columns' values (shifted
            # to the top of an int32, then arithmetic-shifted back: sign extension), and multiply
            # them with x's even and odd columns: two dots of BLOCK_K / 2, no interleaving.
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            even_k = 2 * offs_j
            even_ok = even_k < k_end
            odd_ok = even_k + 1 < k_end
            packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :],
                             mask=n_ok[:, None] & even_ok[None, :], other=0).to(tl.int32)  # (BLOCK_N, BLOCK_K/2)
            x_even = tl.load(x_rows + even_k[None, :], mask=m_ok[:, None] & even_ok[None, :], other=0.0)
            x_odd = tl.load(x_rows + even_k[None, :] + 1, mask=m_ok[:, None] & odd_ok[None, :], other=0.0)
            w_even = ((packed << 24) >> 28).to(x_even.dtype)
            w_odd = ((packed << 28) >> 28).to(x_even.dtype)
            if not PER_ROW:  # group_size is even: columns 2j and 2j+1 share a scale
                s = _group_scales(s_ptr, offs_n, n_ok, even_k, even_ok, k0, stride_sn, GROUP_SIZE, BLOCK_K)
                w_even = w_even * s.to(x_even.dtype)
                w_odd = w_odd * s.to(x_even.dtype)
            acc += tl.dot(x_even, tl.trans(w_even), input_precision=DOT_PRECISION)
            acc += tl.dot(x_odd, tl.trans(w_odd), input_precision=DOT_PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0).to(x.dtype)  # (BLOCK_N, BLOCK_K)
            if not PER_ROW:
                s = _group_scales(s_ptr, offs_n, n_ok, offs_k, k_ok, k0, stride_sn, GROUP_SIZE, BLOCK_K)
                w = w * s.to(x.dtype)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    if PER_ROW:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    if HAS_BIAS:
        if pid_k == 0:  # with a K split, one program per tile adds the bias
            b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def launch_config(M: int, N: int, K: int, device: torch.device) -> dict[str, int]:
    """Tile sizes and K split for a problem: small M tiles for decoding, and K split until the
    output tiles fill the GPU about twice (the number of SMs comes from the device)."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    block_k = 128 if K >= 128 else max(32, triton.next_power_of_2(K))  # INT4: two dots of BLOCK_K / 2 >= 16
    split_k = 1
    if device.type == "cuda":
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        k_blocks = triton.cdiv(K, block_k)
        while tiles * split_k < 2 * sms and split_k * 2 <= min(16, k_blocks // 2):
            split_k *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}


def wxa16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
    in_features: int, bias: torch.Tensor | None = None, split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(qweight, scales).T + bias, (..., N) in x's dtype.

    `split_k` overrides the K split of `launch_config` (tests exercise the atomic path with it).
    """
    K = in_features
    if x.shape[-1] != K:
        raise ValueError(f"wxa16_matmul: x has {x.shape[-1]} input features, the weight {K}")
    if qweight.dtype != torch.int8:
        raise ValueError(f"wxa16_matmul: qweight must be int8, got {qweight.dtype}")
    expected_cols = (K + 1) // 2 if bits == 4 else K
    if qweight.shape[1] != expected_cols:
        raise ValueError(f"wxa16_matmul: {bits}-bit qweight for K={K} needs {expected_cols} columns, "
                         f"got {qweight.shape[1]}")
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    M = x2.shape[0]
    cfg = launch_config(M, N, K, x.device)
    if split_k is not None:
        cfg["SPLIT_K"] = split_k
    out_dtype = torch.float32 if cfg["SPLIT_K"] > 1 else x.dtype
    y = (torch.zeros if cfg["SPLIT_K"] > 1 else torch.empty)(M, N, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _wxa16_kernel[grid](
        x2, qweight, scales, bias if bias is not None else scales, y,
        M, N, K,
        x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, GROUP_SIZE=group_size if scales.shape[1] > 1 else 0, PER_ROW=scales.shape[1] == 1, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays exact (no TF32)
        num_warps=4, num_stages=3, **cfg,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)

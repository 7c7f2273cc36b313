"""Triton kernel for weight-only quantized matmul: INT4 (two per byte) or INT8 weights,
fp16 / bf16 activations (W4A16 / W8A16), per-row or group-wise fp16 scales.

Imported only by `kernels.quant_matmul` when the triton path runs (it imports triton at the
top). Contract and storage layout: see `kernels.quant_matmul`.

Each program computes a (BLOCK_M, BLOCK_N) tile of y = x @ W.T, walking K in BLOCK_K steps:
it loads the packed integers of a (BLOCK_N, BLOCK_K) weight tile, unpacks the nibbles with
shifts in int32, scales them (group-wise: per element; per-row: once on the fp32 accumulator
at the end) and feeds tl.dot. For small batches (decoding) there are few output tiles, so K
is split across SPLIT_K programs that add their partial sums atomically in fp32: a batch-1
matmul is bound by reading the weights, and all SMs must be reading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w_mask = n_ok[:, None] & k_ok[None, :]
        if BITS == 4:
            # Column k sits in byte k // 2: the high nibble for even k, the low one for odd k.
            # Shift that nibble to the top of an int32, then arithmetic-shift it back down.
            byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 2,
                           mask=w_mask, other=0).to(tl.int32)  # (BLOCK_N, BLOCK_K)
            q = (byte << (24 + 4 * (offs_k[None, :] % 2))) >> 28
        else:
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0)
        w = q.to(x.dtype)
        if not PER_ROW:
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_k[None, :] // GROUP_SIZE,
                        mask=w_mask, other=0.0)
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
    block_k = 128 if K >= 128 else max(16, triton.next_power_of_2(K))
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

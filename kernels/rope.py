"""Rotary position embedding (rotate-half convention), 1D and GLM's 2D variant.

Angles are computed from explicit position tensors, so arbitrary GLM positions (Part-B
tokens sharing their mask's position, left-padded batches, KV-cache steps) need no cache
of precomputed tables.
"""

from __future__ import annotations

import torch


def rope_inv_freq(dim: int, base: float = 10000.0, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies for a rotary block of `dim` channels: (dim // 2,)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, d) by positions (B, T); inv_freq: (d // 2,). Computed in fp32."""
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, d)
    xf = x.float()
    out = xf * angles.cos() + _rotate_half(xf) * angles.sin()
    return out.to(x.dtype)


def apply_rope_2d(
    x: torch.Tensor, positions: torch.Tensor, block_positions: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """GLM 2D RoPE: first half of each head by positions, second half by block positions.

    x: (B, nh, T, d); inv_freq for d // 2 channels: (d // 4,).
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((apply_rope(x1, positions, inv_freq), apply_rope(x2, block_positions, inv_freq)), dim=-1)

"""Mixing MIP rows into the self-supervised rows to a target share of tokens (no Ray here)."""

from __future__ import annotations

import numpy as np


def round_robin_rank(groups: np.ndarray, locals_: np.ndarray, counts: dict[int, int]) -> np.ndarray:
    """Rank of each (group, local) row in the order local 0 of every group, then local 1, ...

    counts: rows per group. Interleaving groups (hash buckets, MIP datasets) spreads sources
    evenly through the output instead of one bucket after another.
    """
    keys = sorted(counts)
    sizes = np.array([counts[k] for k in keys])
    position = {k: i for i, k in enumerate(keys)}
    ranks = np.empty(len(groups), dtype=np.int64)
    for n, (g, l) in enumerate(zip(groups.tolist(), locals_.tolist())):
        ranks[n] = np.minimum(sizes, l).sum() + int((sizes[: position[g]] > l).sum())
    return ranks


def choose_mip_count(self_supervised_tokens: int, mip_tokens: np.ndarray, share: float) -> int:
    """How many MIP rows (taken in order) bring the MIP token share closest to `share`."""
    if share <= 0 or len(mip_tokens) == 0:
        return 0
    cumulative = np.cumsum(mip_tokens)
    shares = cumulative / (self_supervised_tokens + cumulative)
    candidates = np.concatenate(([share], np.abs(shares - share)))  # index 0 = no MIP row at all
    return int(np.argmin(candidates))


def mip_positions(n_self_supervised: int, n_mip: int, warmup_rows: int) -> np.ndarray:
    """Positions (sorted) of the MIP rows among all rows, spread evenly, the rate ramping up
    linearly from 0 over the first `warmup_rows` rows when that is > 0."""
    total = n_self_supervised + n_mip
    if n_mip == 0:
        return np.zeros(0, dtype=np.int64)
    p = np.arange(1, total + 1, dtype=np.float64)
    k = float(min(warmup_rows, total))
    ramp = np.minimum(p, k) ** 2 / (2 * k) + np.maximum(p - k, 0) if k > 0 else p  # integral of the rate shape
    expected = ramp * (n_mip / ramp[-1])  # expected MIP rows among the first p rows
    positions = np.searchsorted(expected, np.arange(n_mip) + 0.5)
    for j in range(1, n_mip):  # at most one MIP row per position
        positions[j] = max(positions[j], positions[j - 1] + 1)
    overflow = positions[-1] - (total - 1)
    if overflow > 0:  # pushed past the end: shift the tail back
        positions = np.minimum(positions, np.arange(total - n_mip, total))
    return positions.astype(np.int64)

"""Rows of the data stage's shards addressed by position, so the engine owns its data position.

Position p of the training stream is row `order(epoch)[p % N]` with epoch = p // N: epoch 0
is the data stage's global order (it already mixes MIP with its warm-up), later epochs a
permutation seeded by (seed, epoch). A batch is a function of (consumed samples, count)
only, so a resumed run continues with exactly the next sample; Ray Data iterators cannot
resume mid-epoch (RAY_NOTES.md).
"""

from __future__ import annotations

import json
import posixpath

import numpy as np

from glm.schema import COLUMNS
from stages import storage


class ShardSource:
    """All rows of one split of a data-stage output, in memory as (N, L) int32 arrays."""

    def __init__(self, uri: str, split: str = "train", seed: int = 0, skip_ranges: list[list[int]] | None = None):
        import io

        import pyarrow.parquet as pq

        fs, root = storage.resolve(uri)
        manifest_path = posixpath.join(root, "manifest.json")
        if not storage.exists(fs, manifest_path):
            raise FileNotFoundError(f"{uri}: no manifest.json: not a data-stage output")
        manifest = json.loads(storage.read_bytes(fs, manifest_path))
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise ValueError(f"{uri}: split {split!r} has no rows")
        n = manifest["splits"][split]["rows"]
        seq_len = manifest["schema"]["seq_len"]
        self.columns = {c: np.zeros((n, seq_len), dtype=np.int32) for c in COLUMNS}
        for shard in shards:
            table = pq.read_table(io.BytesIO(storage.read_bytes(fs, posixpath.join(root, shard["file"]))))
            index = table["index"].to_numpy()
            for c in COLUMNS:
                values = table[c].combine_chunks().flatten().to_numpy()
                self.columns[c][index] = values.reshape(-1, seq_len)
        self.size, self.seq_len, self.seed = n, seq_len, seed
        self.skip = [tuple(r) for r in (skip_ranges or [])]
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = (np.arange(self.size) if epoch == 0 else
                                   np.random.default_rng([self.seed, epoch]).permutation(self.size))
        return self._orders[epoch]

    def indices(self, consumed: int, count: int) -> tuple[np.ndarray, int]:
        """The data indices of the next `count` samples after `consumed` stream positions,
        skipping the configured ranges; returns (indices, new consumed)."""
        out = []
        p = consumed
        while len(out) < count:
            index = int(self.order(p // self.size)[p % self.size])
            p += 1
            if any(a <= index < b for a, b in self.skip):
                continue
            out.append(index)
        return np.array(out, dtype=np.int64), p

    def tokens(self, indices: np.ndarray) -> int:
        """Non-padding tokens in these rows."""
        return int(np.count_nonzero(self.columns["segment_ids"][indices]))

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {c: v[indices] for c, v in self.columns.items()}

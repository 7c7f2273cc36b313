"""Near-duplicate removal: MinHash + LSH banding, verified pairs, union-find clusters (no Ray here).

Per document (on the workers, `signature`): the hashed shingles (`shingle_size` tokens: words,
or characters for Chinese, see `stages.data.shingles`) are reduced to `num_perm` minimum
hashes. On the driver (`clusters`): the signature is cut into `bands` bands of
`num_perm / bands` rows; documents sharing a band are candidate pairs; a candidate pair is
kept when the share of equal signature entries (the MinHash estimate of their Jaccard
similarity, over all `num_perm` entries) reaches `threshold`; kept pairs are joined by
union-find. Each cluster keeps its first document in (source, file, line) order, so the
result depends only on the documents, never on worker count or partitioning.

Driver memory: about `bands * 8 + num_perm * 4` bytes per document (~770 bytes with the
defaults: 10M documents ~ 8 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glm.config import ConfigError
from stages.data.shingles import mix64, ngram_hashes, token_hashes, tokens

_MAX32 = np.uint64(0xFFFFFFFF)


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal across all sources."""

    near: bool = True
    """MinHash near-duplicate removal (off: exact duplicates only, by content hash)."""
    shingle_size: int = 5
    """Tokens per shingle: words, or characters for Chinese."""
    num_perm: int = 128
    """MinHash signature length."""
    bands: int = 32
    """LSH bands (num_perm / bands rows each); more bands find pairs of lower similarity (32 x 4:
    a pair of Jaccard similarity 0.8 shares a band with probability 1 - (1 - 0.8^4)^32 > 0.9999;
    the verification, not the banding, sets the threshold)."""
    threshold: float = 0.75
    """A candidate pair is a duplicate when its estimated Jaccard similarity (share of equal
    signature entries; standard error ~0.035 at 0.8 with 128 entries) reaches this."""
    seed: int = 42
    """Seed of the MinHash permutations (not the stage seed: changing it changes the result)."""
    paragraphs: bool = False
    """Also remove exact repeats of paragraphs (blank-line separated) across documents: the first
    occurrence in (source, file, line) order stays."""
    min_paragraph_chars: int = 40
    """Shorter paragraphs are never removed as repeats."""
    max_bucket_pairs: int = 64
    """A band bucket of more documents than this is joined as a chain, not all pairs."""

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ConfigError(f"dedup: num_perm ({self.num_perm}) must be a positive multiple of bands ({self.bands})")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.shingle_size < 1:
            raise ConfigError("dedup.shingle_size must be >= 1")


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the multiply-shift hash family: h -> ((a * h + b) mod 2^64) >> 32."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(1, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def shingles(text: str, size: int, cache: dict | None = None, hashes: np.ndarray | None = None) -> np.ndarray:
    """Unique shingle hashes; a document shorter than one shingle is one shingle of all its tokens
    (hashes: the text's token hashes, when already computed)."""
    hashes = token_hashes(tokens(text), cache) if hashes is None else hashes
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.unique(ngram_hashes(hashes, min(size, len(hashes))))


def signature(shingle_hashes: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """MinHash signature (uint32, len(a)) of a set of 64-bit shingle hashes."""
    sig = np.full(len(a), 0xFFFFFFFF, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingle_hashes), chunk):
            h = shingle_hashes[start:start + chunk, None]
            sig = np.minimum(sig, ((h * a + b) >> np.uint64(32)).min(axis=0))
    return (sig & _MAX32).astype(np.uint32)


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) uint64 keys: one hash per band of each signature (band index mixed in)."""
    n, num_perm = signatures.shape
    rows = num_perm // bands
    s = signatures.astype(np.uint64).reshape(n, bands, rows)
    acc = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            acc = mix64(acc * np.uint64(0x100000001B3) + s[:, :, r])
        return mix64(acc + np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def candidate_pairs(keys: np.ndarray, max_bucket_pairs: int) -> np.ndarray:
    """(m, 2) int64 pairs (i < j) of documents sharing a band key, unique, sorted.

    A bucket of at most max_bucket_pairs documents gives all its pairs; a larger one a chain
    (each document with the next), which union-find still joins when the pairs verify."""
    n, bands = keys.shape
    out = []
    for band in range(bands):
        k = keys[:, band]
        order = np.argsort(k, kind="stable")
        sk = k[order]
        boundaries = np.flatnonzero(np.diff(sk) != 0) + 1
        starts = np.concatenate(([0], boundaries))
        ends = np.concatenate((boundaries, [n]))
        sizes = ends - starts
        multi = sizes > 1
        if not multi.any():
            continue
        # chains: every document with the next one in its bucket
        nxt = np.flatnonzero(np.concatenate((np.diff(sk) == 0, [False])))
        out.append(np.stack([order[nxt], order[nxt + 1]], axis=1))
        for s, e in zip(starts[multi & (sizes > 2) & (sizes <= max_bucket_pairs)],
                        ends[multi & (sizes > 2) & (sizes <= max_bucket_pairs)]):
            members = order[s:e]
            i, j = np.triu_indices(len(members), k=2)  # k=1 pairs are the chain already
            out.append(np.stack([members[i], members[j]], axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(out).astype(np.int64)
    pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0)


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller index is the root: the root is the cluster's first document
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def clusters(signatures: np.ndarray, exact: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, dict]:
    """Cluster root of every document; documents must be given in keep order (index 0 first).

    signatures: (n, num_perm) uint32 (ignored unless cfg.near); exact: (n,) content hashes,
    equal hashes are always one cluster. Returns (root per document, statistics)."""
    n = len(exact)
    uf = UnionFind(n)
    stats = {"candidate_pairs": 0, "verified_pairs": 0}
    if n == 0:
        return np.zeros(0, dtype=np.int64), stats
    # exact duplicates: each document joined to the first with its hash
    order = np.argsort(exact, kind="stable")
    same = np.flatnonzero(np.diff(exact[order]) == 0)
    for i in same.tolist():
        uf.union(int(order[i]), int(order[i + 1]))
    if cfg.near and n > 1:
        pairs = candidate_pairs(band_keys(signatures, cfg.bands), cfg.max_bucket_pairs)
        stats["candidate_pairs"] = int(len(pairs))
        verified = pairs[:0]
        for start in range(0, len(pairs), 65536):
            p = pairs[start:start + 65536]
            similarity = (signatures[p[:, 0]] == signatures[p[:, 1]]).mean(axis=1)
            verified = np.concatenate([verified, p[similarity >= cfg.threshold]])
        stats["verified_pairs"] = int(len(verified))
        for i, j in verified.tolist():
            uf.union(i, j)
    return uf.roots(), stats


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs (stripped, empty ones dropped)."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def repeated_paragraphs(para_hashes: list[np.ndarray]) -> dict[int, list[int]]:
    """Document index (keep order) -> indices of its paragraphs that appeared in an earlier
    document (hash 0 = too short to count)."""
    seen: set[int] = set()
    out: dict[int, list[int]] = {}
    for d, hashes in enumerate(para_hashes):
        mine = set()
        for p, h in enumerate(hashes.tolist()):
            if h == 0:
                continue
            if h in seen:
                out.setdefault(d, []).append(p)
            else:
                mine.add(h)
        seen |= mine
    return out

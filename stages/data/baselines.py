"""Count-model baselines: the perplexity a unigram and a bigram model reach on the tokens a GLM
model is scored on, so every run says how far above the simplest models it is.

Both are fitted on (previous token, token) pairs of training text and scored on the predicted
(Part B) tokens of held-out rows or windows, each with the real text token before it:

- unigram: add-one (Laplace) smoothed counts, p(w) = (c(w) + 1) / (N + V);
- bigram: Witten-Bell interpolation with that unigram, p(w | v) = (c(v, w) + T(v) p(w)) / (c(v) + T(v)),
  T(v) = number of distinct followers of v (p(w) alone when v was never seen).

No Ray and no torch here: numpy only, so the data stage, pretraining and benchmarks share it.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from glm.schema import IGNORE_INDEX


class CountModels:
    """Unigram and bigram counts over a vocabulary of `vocab_size` ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.unigram = np.zeros(self.vocab_size, dtype=np.int64)
        self._pairs: list[np.ndarray] = []
        self._fitted = False

    def add(self, prev: np.ndarray, token: np.ndarray) -> None:
        """Count pairs (prev[i], token[i]); prev < 0 counts the token for the unigram only."""
        prev, token = np.asarray(prev, dtype=np.int64), np.asarray(token, dtype=np.int64)
        self.unigram += np.bincount(token, minlength=self.vocab_size)[: self.vocab_size]
        keep = prev >= 0
        self._pairs.append(prev[keep] * self.vocab_size + token[keep])
        self._fitted = False

    def add_sequence(self, tokens: Iterable[int]) -> None:
        """Count every token of a text and each consecutive pair."""
        t = np.asarray(list(tokens), dtype=np.int64)
        if len(t):
            self.add(np.concatenate([[-1], t[:-1]]), t)

    def _fit(self) -> None:
        keys = np.concatenate(self._pairs) if self._pairs else np.zeros(0, dtype=np.int64)
        self._keys, self._counts = np.unique(keys, return_counts=True)
        prev = self._keys // self.vocab_size
        self._context = np.bincount(prev, weights=self._counts, minlength=self.vocab_size)
        self._types = np.bincount(prev, minlength=self.vocab_size).astype(np.float64)
        self._pairs = [keys]
        self._fitted = True

    def unigram_prob(self, token: np.ndarray) -> np.ndarray:
        return (self.unigram[token] + 1.0) / (self.unigram.sum() + self.vocab_size)

    def bigram_prob(self, prev: np.ndarray, token: np.ndarray) -> np.ndarray:
        if not self._fitted:
            self._fit()
        prev, token = np.asarray(prev, dtype=np.int64), np.asarray(token, dtype=np.int64)
        p_uni = self.unigram_prob(token)
        safe_prev = np.where(prev >= 0, prev, 0)
        keys = safe_prev * self.vocab_size + token
        at = np.searchsorted(self._keys, keys)
        found = (at < len(self._keys)) & (self._keys[np.minimum(at, len(self._keys) - 1)] == keys) if len(self._keys) \
            else np.zeros(len(keys), dtype=bool)
        pair = np.where(found, self._counts[np.minimum(at, max(len(self._keys) - 1, 0))] if len(self._keys) else 0, 0)
        context, types = self._context[safe_prev], self._types[safe_prev]
        seen = (prev >= 0) & (context > 0)
        p = (pair + types * p_uni) / np.where(seen, context + types, 1.0)
        return np.where(seen, p, p_uni)

    def perplexities(self, prev: np.ndarray, token: np.ndarray) -> dict[str, float]:
        """{"unigram_ppl", "bigram_ppl", "tokens"} over the scored pairs."""
        token = np.asarray(token, dtype=np.int64)
        if not len(token):
            raise ValueError("no tokens to score")
        return {"unigram_ppl": float(math.exp(-np.log(self.unigram_prob(token)).mean())),
                "bigram_ppl": float(math.exp(-np.log(self.bigram_prob(prev, token)).mean())),
                "tokens": int(len(token))}


def row_pairs(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, segment_ids: np.ndarray,
              mask_ids: tuple[int, ...], sop: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous text token, target) of every predicted position of rows of the sample schema.

    Inside a Part-B span the previous token is the span's previous input; at its [sop] it is the
    Part-A token just before the span's mask ([MASK] / [gMASK]), -1 when the mask starts the
    sample (then only the unigram applies)."""
    prevs, tokens = [], []
    masks = np.asarray(mask_ids)
    for ids, lab, pos, seg in zip(np.asarray(input_ids), np.asarray(labels), np.asarray(position_ids),
                                  np.asarray(segment_ids)):
        where = np.nonzero(lab != IGNORE_INDEX)[0]
        if not len(where):
            continue
        prev = ids[where].astype(np.int64)
        for i in np.nonzero(ids[where] == sop)[0]:
            j = where[i]
            start = int(np.argmax(seg == seg[j]))  # first index of this packed sample
            m = start + int(pos[j])
            if not (m < len(ids) and ids[m] in masks):
                m -= 1  # 1D [gMASK] spans continue the positions after Part A
            ok = start <= m - 1 and m < len(ids) and ids[m] in masks and ids[m - 1] not in masks
            prev[i] = ids[m - 1] if ok else -1
        prevs.append(prev)
        tokens.append(lab[where].astype(np.int64))
    if not tokens:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(prevs), np.concatenate(tokens)


def window_pairs(windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(previous token, target) of the predicted tokens of windows scored as [gMASK] samples
    (`stages.quantize.quality.gmask_batches`: the first quarter is context, the rest predicted)."""
    prevs, tokens = [], []
    for w in windows:
        k = len(w) // 4
        prevs.append(np.asarray(([w[k - 1]] if k else [-1]) + w[k:-1], dtype=np.int64))
        tokens.append(np.asarray(w[k:], dtype=np.int64))
    return np.concatenate(prevs), np.concatenate(tokens)


def split_baselines(train: dict[str, np.ndarray], validation: dict[str, np.ndarray], vocab_size: int,
                    mask_ids: tuple[int, ...], sop: int) -> dict[str, float]:
    """Count models fitted on the predicted tokens of training rows, scored on validation rows
    (dicts of (N, L) arrays of the sample schema); {} when validation predicts nothing."""
    return pair_baselines(_pairs(train, mask_ids, sop), _pairs(validation, mask_ids, sop), vocab_size)


def pair_baselines(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                   vocab_size: int) -> dict[str, float]:
    """Count models fitted on the (previous token, target) pairs `train`, scored on `validation`
    (`row_pairs`' results); {} when validation predicts nothing."""
    models = CountModels(vocab_size)
    models.add(*train)
    prev, token = validation
    return models.perplexities(prev, token) if len(token) else {}


def shard_pairs(file: str, fs, root: str, seq_len: int, mask_ids: tuple[int, ...], sop: int):
    """`row_pairs` of every row of one shard file (the data stage runs one task per file)."""
    return _pairs(read_split(fs, root, [file], seq_len), mask_ids, sop)


def _pairs(rows: dict[str, np.ndarray], mask_ids, sop):
    return row_pairs(rows["input_ids"], rows["labels"], rows["position_ids"], rows["segment_ids"], mask_ids, sop)


def read_split(fs, root: str, files: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """The columns the baselines need, of every row of these shard files (row order irrelevant)."""
    import io

    import pyarrow.parquet as pq

    from stages import storage

    columns = ("input_ids", "labels", "position_ids", "segment_ids")
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for file in files:
        table = pq.read_table(io.BytesIO(storage.read_bytes(fs, f"{root}/{file}")), columns=list(columns))
        for c in columns:
            parts[c].append(table[c].combine_chunks().flatten().to_numpy().reshape(-1, seq_len))
    return {c: (np.concatenate(v) if v else np.zeros((0, seq_len), dtype=np.int32)) for c, v in parts.items()}

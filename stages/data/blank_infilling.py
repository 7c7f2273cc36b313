"""GLM blank-infilling rows from a token stream (GLM_SPEC.md section 1), no Ray here.

A bucket's documents form one token stream (each followed by end-of-text). Row after row is
cut from it: with probability `mask_sequence_share` a row of packed [MASK] samples
(seq_len / mask_window windows, spans of Poisson lengths covering `mask_coverage`), else one
[gMASK] sample (keep a prefix, generate the suffix). All randomness of row `index` comes from
`sample_rng(seed, split, bucket, index)`, so a row never depends on which worker built it.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from glm.schema import Sample, SpecialTokens, layout_blank_infilling, layout_gmask, pack_samples
from stages.data.config import ObjectiveConfig

KIND_GMASK, KIND_MASK, KIND_MIP = 0, 1, 2


def sample_rng(seed: int, *index: int | str) -> random.Random:
    """The RNG of one sample, derived from the config seed and the sample's index only."""
    digest = hashlib.sha256(":".join(map(str, (seed,) + index)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def poisson(rng: random.Random, lam: float) -> int:
    """Knuth's Poisson sampler (lambda is small)."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


@dataclass
class BuiltRow:
    row: dict[str, list[int]]
    kind: int
    text_tokens: int
    """Tokens of the stream this row consumed."""
    spans: list[int]
    """Lengths of the [MASK] spans (empty for [gMASK])."""


class BlankInfillingBuilder:
    """Cuts rows of the sample schema from a token stream."""

    def __init__(self, cfg: ObjectiveConfig, special: SpecialTokens, seed: int):
        self.cfg, self.special, self.seed = cfg, special, seed
        self.windows = cfg.seq_len // cfg.mask_window
        # Text tokens per [MASK] window: the layout adds [sop] and [eop] per span and spans
        # number about coverage / E[len] of the text, so keep room for 1.25x that.
        mean_span = max(cfg.poisson_lambda, 1.0)
        self.window_text = int(cfg.mask_window / (1 + 2.5 * cfg.mask_coverage / mean_span))
        self.gmask_text = cfg.seq_len - 1  # layout_gmask adds [gMASK]

    def mask_spans(self, n: int, rng: random.Random) -> list[tuple[int, int]]:
        """Non-overlapping spans (start, end) covering round(coverage * n) tokens, in shuffled order."""
        target = max(1, round(self.cfg.mask_coverage * n))
        max_spans = (self.cfg.mask_window - n) // 2
        lengths: list[int] = []
        while sum(lengths) < target and len(lengths) < max_spans:
            length = min(max(1, poisson(rng, self.cfg.poisson_lambda)), self.cfg.max_span)
            lengths.append(min(length, target - sum(lengths)))
        k = len(lengths)
        free = n - sum(lengths) - (k - 1)  # unmasked tokens beyond the one between spans
        # Stars and bars: k + 1 gaps summing to `free`, inner gaps then get +1.
        cuts = sorted(rng.sample(range(free + k), k))
        gaps = [cuts[0]] + [cuts[i] - cuts[i - 1] - 1 for i in range(1, k)] + [free + k - 1 - cuts[-1]]
        spans, pos = [], 0
        for i, length in enumerate(lengths):
            pos += gaps[i] + (1 if i else 0)
            spans.append((pos, pos + length))
            pos += length
        rng.shuffle(spans)
        return spans

    def tokens_needed(self, kind: int) -> int:
        return self.window_text * self.windows if kind == KIND_MASK else self.gmask_text

    def build(self, tokens: list[int], kind: int, rng: random.Random) -> BuiltRow:
        use_2d = self.cfg.use_2d
        if kind == KIND_MASK:
            samples, spans = [], []
            for w in range(self.windows):
                window = tokens[w * self.window_text:(w + 1) * self.window_text]
                if len(window) < 2:
                    break
                s = self.mask_spans(len(window), rng)
                spans += [e - b for b, e in s]
                samples.append(layout_blank_infilling(window, s, self.special, use_2d=use_2d))
        else:
            ratio = rng.uniform(self.cfg.min_gmask_ratio, self.cfg.max_gmask_ratio)
            masked = min(len(tokens) - 1, max(1, round(len(tokens) * ratio))) if len(tokens) > 1 else 1
            samples, spans = [layout_gmask(tokens, len(tokens) - masked, self.special, use_2d=use_2d)], []
        row = pack_samples(samples, self.cfg.seq_len, self.special.pad)
        return BuiltRow(row=row, kind=kind, text_tokens=len(tokens), spans=spans)

    def build_stream(self, stream: list[int], split: str, bucket: int) -> list[BuiltRow]:
        """Rows cut one after another from `stream`; a final partial chunk becomes a padded [gMASK] row."""
        rows, cursor, index = [], 0, 0
        while cursor < len(stream):
            rng = sample_rng(self.seed, split, bucket, index)
            kind = KIND_MASK if rng.random() < self.cfg.mask_sequence_share else KIND_GMASK
            need = self.tokens_needed(kind)
            if cursor + need > len(stream):
                kind, need = KIND_GMASK, min(self.gmask_text, len(stream) - cursor)
                if need < 2:
                    break
            rows.append(self.build(stream[cursor:cursor + need], kind, rng))
            cursor += need
            index += 1
        return rows


def pack_prompted(samples: list[Sample], seq_len: int, window: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Pack prompted (MIP) samples, in order, into rows of at most seq_len // window samples."""
    per_row = seq_len // window
    rows, current, used = [], [], 0
    for s in samples:
        if current and (len(current) == per_row or used + len(s) > seq_len):
            rows.append(pack_samples(current, seq_len, pad_id))
            current, used = [], 0
        current.append(s)
        used += len(s)
    if current:
        rows.append(pack_samples(current, seq_len, pad_id))
    return rows

"""Gopher-style quality and repetition rules, with variants for Chinese (no Ray here).

Rae et al. 2021 (Gopher), appendix A: a document is dropped when one rule fails. Words are
`stages.data.shingles.tokens` (lower-cased words; every CJK character a token of its own).
A document whose tokens are mostly CJK characters gets the Chinese variant: counts in
characters, a Chinese stop-word list (modern and classical function characters), no mean
word length rule, and n-gram repetition measured on character n-grams with their own thresholds.

`check(text, cfg)` returns "" (keep) or the name of the first rule that failed, in RULES order.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from stages.data.shingles import cjk_share, ngram_hashes, token_hashes, tokens

RULES = (
    "word_count", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines", "alpha_words", "stop_words",
    "duplicate_lines", "duplicate_paragraphs", "duplicate_line_chars", "duplicate_paragraph_chars",
    "top_ngram", "duplicate_ngrams",
)

STOP_WORDS_EN = ("the", "be", "to", "of", "and", "that", "have", "with")
# modern (的 了 是 在 和 有 我 他 这 也 就 不 人 都 一) and classical (之 而 其 以 者 於 乎 焉 矣 也) function characters
STOP_WORDS_ZH = ("的", "了", "是", "在", "和", "有", "我", "他", "这", "就", "不", "人", "都", "一",
                 "之", "而", "其", "以", "者", "於", "于", "乎", "焉", "矣", "也", "曰")
_LETTER = re.compile(r"[^\W\d_]")
BULLETS = ("•", "●", "‣", "–", "- ", "* ", "·", "\u2022", "\u25aa")


@dataclass
class QualityConfig:
    """Thresholds of the Gopher quality and repetition rules (Rae et al. 2021, appendix A)."""

    enabled: bool = True
    """Apply the rules (off: no document is dropped for quality)."""
    min_words: int = 50
    """Fewest words (Chinese: characters + other words) in a document."""
    max_words: int = 100_000
    """Most words in a document."""
    min_cjk_words: int = 30
    """Chinese: fewest tokens (characters + other words) in a document (short poems are documents too)."""
    min_mean_word_length: float = 3.0
    """Shortest mean word length in characters (not applied to Chinese)."""
    max_mean_word_length: float = 10.0
    """Longest mean word length in characters (not applied to Chinese)."""
    max_symbol_ratio: float = 0.1
    """Most '#' and ellipsis ('...', '…') per word."""
    max_bullet_lines: float = 0.9
    """Largest share of lines starting with a bullet."""
    max_ellipsis_lines: float = 0.3
    """Largest share of lines ending with an ellipsis."""
    min_alpha_words: float = 0.8
    """Smallest share of words holding an alphabetic character (CJK characters count)."""
    min_stop_words: int = 2
    """Fewest distinct stop words present (English: the, be, to, of, and, that, have, with;
    Chinese: common modern and classical function characters)."""
    max_duplicate_lines: float = 0.3
    """Largest share of lines that repeat an earlier line."""
    max_duplicate_paragraphs: float = 0.3
    """Largest share of paragraphs (blank-line separated) that repeat an earlier one."""
    max_duplicate_line_chars: float = 0.2
    """Largest share of characters in repeated lines."""
    max_duplicate_paragraph_chars: float = 0.2
    """Largest share of characters in repeated paragraphs."""
    max_top_ngram: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> largest share of word characters covered by the most frequent word n-gram."""
    max_duplicate_ngrams: dict[int, float] = field(default_factory=lambda: {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> largest share of word characters inside repeated word n-grams."""
    cjk_max_top_ngram: dict[int, float] = field(default_factory=lambda: {4: 0.35, 6: 0.35, 8: 0.3})
    """Chinese: n characters -> largest share covered by the most frequent character n-gram
    (looser than the word rule: the refrains of classical poetry are not spam)."""
    cjk_max_duplicate_ngrams: dict[int, float] = field(default_factory=lambda: {10: 0.3, 15: 0.25, 20: 0.2})
    """Chinese: n characters -> largest share of characters inside repeated character n-grams."""

    def __post_init__(self) -> None:
        for name in ("max_top_ngram", "max_duplicate_ngrams", "cjk_max_top_ngram", "cjk_max_duplicate_ngrams"):
            setattr(self, name, {int(k): float(v) for k, v in getattr(self, name).items()})


def _repeats(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(len(i) for i in items)
    return dup / len(items), (dup_chars / total_chars if total_chars else 0.0)


def _top_ngram_share(hashes: np.ndarray, lengths: np.ndarray, n: int, total: int) -> float:
    """Characters covered by the most frequent n-gram's occurrences / all word characters."""
    grams = ngram_hashes(hashes, n)
    if len(grams) == 0 or total == 0:
        return 0.0
    values, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    first = int(np.flatnonzero(inverse == top)[0])
    return float(counts[top] * lengths[first:first + n].sum()) / total


def _duplicate_ngram_share(hashes: np.ndarray, lengths: np.ndarray, n: int, total: int) -> float:
    """Characters of words inside any repeated occurrence of an n-gram / all word characters."""
    grams = ngram_hashes(hashes, n)
    if len(grams) == 0 or total == 0:
        return 0.0
    _, first = np.unique(grams, return_index=True)
    repeat = np.ones(len(grams), dtype=bool)
    repeat[first] = False
    if not repeat.any():
        return 0.0
    cover = np.zeros(len(hashes) + 1, dtype=np.int64)
    starts = np.flatnonzero(repeat)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(lengths[covered].sum()) / total


def check(text: str, cfg: QualityConfig, toks: list[str] | None = None, hashes: np.ndarray | None = None) -> str:
    """"" if the document passes every rule, else the first rule it fails (toks / hashes: the
    text's tokens and token hashes, when already computed)."""
    if not cfg.enabled:
        return ""
    toks = tokens(text) if toks is None else toks
    zh = cjk_share(toks) >= 0.5
    n = len(toks)
    if not (cfg.min_cjk_words if zh else cfg.min_words) <= n <= cfg.max_words:
        return "word_count"
    lengths = np.fromiter((len(t) for t in toks), dtype=np.int64, count=n)
    if not zh:
        mean = float(lengths.mean())
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_ratio:
        return "symbol_ratio"
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    if lines:
        if sum(1 for l in lines if l.startswith(BULLETS)) / len(lines) > cfg.max_bullet_lines:
            return "bullet_lines"
        if sum(1 for l in lines if l.endswith(("...", "…"))) / len(lines) > cfg.max_ellipsis_lines:
            return "ellipsis_lines"
    words = text.split() if not zh else toks
    if words and sum(1 for w in words if _LETTER.search(w)) / len(words) < cfg.min_alpha_words:
        return "alpha_words"
    stop = STOP_WORDS_ZH if zh else STOP_WORDS_EN
    counts = Counter(toks) if len(toks) < 50_000 else Counter(toks[:50_000])
    if sum(1 for w in stop if counts.get(w)) < cfg.min_stop_words:
        return "stop_words"
    line_dup, line_chars = _repeats(lines)
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    para_dup, para_chars = _repeats(paras)
    if line_dup > cfg.max_duplicate_lines:
        return "duplicate_lines"
    if para_dup > cfg.max_duplicate_paragraphs:
        return "duplicate_paragraphs"
    if line_chars > cfg.max_duplicate_line_chars:
        return "duplicate_line_chars"
    if para_chars > cfg.max_duplicate_paragraph_chars:
        return "duplicate_paragraph_chars"
    hashes = token_hashes(toks) if hashes is None else hashes
    total = int(lengths.sum())
    top, repeated = (cfg.cjk_max_top_ngram, cfg.cjk_max_duplicate_ngrams) if zh else (
        cfg.max_top_ngram, cfg.max_duplicate_ngrams)
    for size, limit in sorted(top.items()):
        if _top_ngram_share(hashes, lengths, size, total) > limit:
            return "top_ngram"
    for size, limit in sorted(repeated.items()):
        if _duplicate_ngram_share(hashes, lengths, size, total) > limit:
            return "duplicate_ngrams"
    return ""

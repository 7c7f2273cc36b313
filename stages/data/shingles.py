"""Words, CJK characters and hashed n-grams of a document (no Ray here).

One tokenisation serves near-duplicate detection, decontamination and the repetition
filters: lower-cased words, except that every CJK character (Han, kana) is a token of its
own, so a Chinese text is shingled by characters and an English one by words, and mixed text
by both. Hashes are stable across processes and machines (xxHash, fixed seeds), never
Python's randomised `hash`.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
CJK_RE = re.compile(f"[{_CJK}]")
_MASK64 = (1 << 64) - 1
# odd multipliers of the n-gram combination, one per position in the n-gram
_POSITION = np.array([(0x9E3779B97F4A7C15 * (2 * i + 1)) & _MASK64 for i in range(64)], dtype=np.uint64)


def tokens(text: str) -> list[str]:
    """Lower-cased words, each CJK character a token of its own."""
    return TOKEN_RE.findall(text.lower())


def is_cjk_token(token: str) -> bool:
    return len(token) == 1 and CJK_RE.match(token) is not None


def cjk_share(toks: list[str]) -> float:
    """Share of tokens that are CJK characters (0 for no tokens)."""
    if not toks:
        return 0.0
    return len(CJK_RE.findall("".join(t for t in toks if len(t) == 1))) / len(toks)


_CACHE: dict[str, int] = {}


def token_hashes(toks: list[str], cache: dict[str, int] | None = None) -> np.ndarray:
    """A stable 64-bit hash per token (uint64); a per-process cache of token hashes by default."""
    cache = _CACHE if cache is None else cache
    if len(cache) > 2_000_000:
        cache.clear()
    get = cache.get
    values = []
    for t in toks:
        h = get(t)
        if h is None:
            h = cache[t] = xxhash.xxh64_intdigest(t.encode("utf-8"))
        values.append(h)
    return np.array(values, dtype=np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, element-wise on uint64 (spreads the bits of a combination)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of n consecutive tokens (len - n + 1 values; none if shorter)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc += hashes[k:k + m] * _POSITION[k]
        return mix64(acc ^ np.uint64(n))


def text_ngrams(text: str, n: int, cjk_n: int | None = None, cache: dict | None = None,
                toks: list[str] | None = None, hashes: np.ndarray | None = None) -> np.ndarray:
    """Unique n-gram hashes of a text: n tokens, or cjk_n when most tokens are CJK characters
    (toks / hashes: the text's tokens and token hashes, when already computed)."""
    toks = tokens(text) if toks is None else toks
    size = cjk_n if cjk_n and cjk_share(toks) >= 0.5 else n
    return np.unique(ngram_hashes(token_hashes(toks, cache) if hashes is None else hashes, size))

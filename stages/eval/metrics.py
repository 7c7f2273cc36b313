"""Answer metrics: exact match and F1 with SQuAD normalisation (English words) or a
character-level variant for Chinese (CMRC 2018); standard errors (binomial, bootstrap), the
chance and majority baselines of a task, and item-weighted group means."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Callable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# CJK ideographs and fullwidth forms are scored one character at a time
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def squad_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    return _ARTICLES.sub(" ", text).split()


def chinese_tokens(text: str) -> list[str]:
    """CMRC 2018 style: lower case, no punctuation (Chinese or English), each CJK character a
    token, runs of other characters (English words, numbers) one token each."""
    tokens: list[str] = []
    word = ""
    for ch in text.lower():
        if _is_punctuation(ch) or ch.isspace() or _CJK.match(ch):
            if word:
                tokens.append(word)
                word = ""
            if _CJK.match(ch):
                tokens.append(ch)
        else:
            word += ch
    if word:
        tokens.append(word)
    return tokens


TOKENIZERS = {"squad": squad_tokens, "chinese": chinese_tokens}


def exact_match(prediction: str, references: list[str], normalization: str = "squad") -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    tok = TOKENIZERS[normalization]
    pred = tok(prediction)
    return float(any(pred == tok(r) for r in references))


def f1(prediction: str, references: list[str], normalization: str = "squad") -> float:
    """Best token-overlap F1 of the prediction against the references."""
    tok = TOKENIZERS[normalization]
    pred = tok(prediction)
    best = 0.0
    for ref in references:
        gold = tok(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


BINOMIAL = ("accuracy", "accuracy_norm", "exact_match", "last_word_accuracy")
"""Metrics that are a share of items right (0 or 1 each): their standard error is binomial."""
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


def binomial_stderr(p: float, n: int) -> float | None:
    """Standard error of a share p of n items, sqrt(p (1 - p) / n) (None for no items).
    (lm-evaluation-harness divides by n - 1: larger by sqrt(n / (n - 1)).)"""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else None


def bootstrap_stderr(statistic: Callable[..., np.ndarray], columns: Sequence[Sequence[float]],
                     iters: int = 1000, seed: int = 1234) -> float | None:
    """Standard deviation of `statistic` over `iters` resamples of the items with replacement.

    `columns` are per-item values (one sequence per quantity, e.g. NLL and tokens per document);
    `statistic` takes them resampled, each an array (resamples, items), and returns one value
    per resample. Seeded: the same inputs give the same error. None with < 2 items or iters < 2."""
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(cols[0])
    if n < 2 or iters < 2:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // n)  # at most about a million gathered values at a time
    values = []
    for start in range(0, iters, chunk):
        idx = rng.integers(0, n, size=(min(chunk, iters - start), n))
        values.append(statistic(*(c[idx] for c in cols)))
    return float(np.concatenate(values).std(ddof=1))


def mean_of(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=1)


def perplexity_of(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return np.exp(nll.sum(axis=1) / tokens.sum(axis=1))


def bits_per_byte_of(nll: np.ndarray, n_bytes: np.ndarray) -> np.ndarray:
    return nll.sum(axis=1) / math.log(2) / n_bytes.sum(axis=1)


def choice_baselines(num_choices: list[int], labels: list[int]) -> dict[str, float]:
    """Multiple choice: `chance`, the accuracy of picking a choice at random (mean of 1 / choices),
    and `majority`, of always picking the most frequent right answer's position (the share of it)."""
    return {"chance": sum(1.0 / k for k in num_choices) / len(num_choices),
            "majority": Counter(labels).most_common(1)[0][1] / len(labels)}


def majority_answer(references: list[list[str]], normalization: str = "squad") -> str:
    """Generation: the most frequent (normalised) first reference, the answer a constant guess gives."""
    tok = TOKENIZERS[normalization]
    counts = Counter(" ".join(tok(refs[0])) for refs in references)
    top = counts.most_common(1)[0][0]
    return next(refs[0] for refs in references if " ".join(tok(refs[0])) == top)


def group_means(results: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, dict]:
    """Per group: each metric's mean over its tasks weighted by their item counts, its standard
    error, and the items.

    Perplexity is combined from the tasks' token NLLs (exp of the pooled mean) rather than
    averaged, and has no group error. The error of a weighted mean of independent tasks is
    sqrt(sum (n_i / n)^2 se_i^2), given when every task has one.
    """
    out: dict[str, dict] = {}
    for group, names in sorted(groups.items()):
        members = [results[n] for n in names]
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key in sorted({k for m in members for k in m["metrics"]}):
            having = [m for m in members if key in m["metrics"]]
            errors = [m.get("stderr", {}).get(key) for m in having]
            if key == "perplexity":
                tokens = sum(m["tokens"] for m in having)
                metrics[key] = math.exp(sum(m["nll"] for m in having) / tokens)
                stderr[key] = None
            else:
                n = sum(m["items"] for m in having)
                metrics[key] = sum(m["metrics"][key] * m["items"] for m in having) / n
                stderr[key] = None if None in errors else \
                    math.sqrt(sum((m["items"] / n * se) ** 2 for m, se in zip(having, errors)))
        out[group] = {"metrics": metrics, "items": sum(m["items"] for m in members), "tasks": sorted(names),
                      "stderr": stderr}
    return out

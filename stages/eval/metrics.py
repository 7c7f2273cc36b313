"""Answer metrics: exact match and F1 with SQuAD normalisation (English words) or a
character-level variant for Chinese (CMRC 2018), and item-weighted group means."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter

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


def group_means(results: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, dict]:
    """Per group: each metric's mean over its tasks weighted by their item counts, and the items.

    Perplexity is combined from the tasks' token NLLs (exp of the pooled mean) rather than averaged.
    """
    out: dict[str, dict] = {}
    for group, names in sorted(groups.items()):
        members = [results[n] for n in names]
        metrics: dict[str, float] = {}
        for key in sorted({k for m in members for k in m["metrics"]}):
            having = [m for m in members if key in m["metrics"]]
            if key == "perplexity":
                tokens = sum(m["tokens"] for m in having)
                metrics[key] = math.exp(sum(m["nll"] for m in having) / tokens)
            else:
                n = sum(m["items"] for m in having)
                metrics[key] = sum(m["metrics"][key] * m["items"] for m in having) / n
        out[group] = {"metrics": metrics, "items": sum(m["items"] for m in members), "tasks": sorted(names)}
    return out

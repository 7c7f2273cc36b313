"""Verifiable rule rewards of a rollout (each in [0, 1]) and their weighted sum with the model
reward (`RewardsConfig`): answer language, length window, repetition, format."""

from __future__ import annotations

from stages.effects import language
from stages.rlhf.config import RewardsConfig


def same_language(prompt: str, reply: str) -> float:
    """1 when the reply is in the prompt's language (a prompt without letters: any reply with some)."""
    lang = language(reply)
    if lang is None:
        return 0.0
    wanted = language(prompt)
    return float(wanted is None or lang == wanted)


def in_length(tokens: list[int], low: int, high: int) -> float:
    return float(low <= len(tokens) <= high)


def distinct_ngrams(tokens: list[int], n: int) -> float:
    """Share of the reply's token n-grams that are distinct (1 = none repeats, a loop -> about 0);
    1 for a reply shorter than n."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def rule_scores(cfg: RewardsConfig, prompts: list[str], replies: list[str], tokens: list[list[int]],
                stopped: list[bool]) -> dict[str, list[float]]:
    """Each configured rule's score per rollout (name -> list)."""
    rules = {
        "language": lambda i: same_language(prompts[i], replies[i]),
        "length": lambda i: in_length(tokens[i], cfg.min_tokens, cfg.max_tokens),
        "repetition": lambda i: distinct_ngrams(tokens[i], cfg.ngram),
        "format": lambda i: float(stopped[i]),
    }
    return {name: [rules[name](i) for i in range(len(tokens))] for name in cfg.rules}


def combine(cfg: RewardsConfig, model: list[float], rules: dict[str, list[float]]) -> list[float]:
    """weight_model x model + sum of weight_rule x rule, per rollout."""
    weights = cfg.rules
    return [cfg.model * m + sum(weights[name] * scores[i] for name, scores in rules.items())
            for i, m in enumerate(model)]

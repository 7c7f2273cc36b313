"""Exact match and F1 (SQuAD normalisation, English; character level, Chinese), standard errors, baselines, group means."""

import math

import pytest

from stages.eval.metrics import chinese_tokens, exact_match, f1, group_means, squad_tokens


def test_squad_normalisation():
    assert squad_tokens("The  Eiffel-Tower!") == ["eiffeltower"]
    assert squad_tokens("an apple, a pear") == ["apple", "pear"]
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0


def test_english_f1():
    # prediction {paris, france} vs gold {paris}: precision 1/2, recall 1 -> 2/3
    assert f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    assert f1("Paris, France", ["London", "paris france"]) == 1.0  # best reference counts
    assert f1("Berlin", ["Paris"]) == 0.0
    assert f1("the", ["a"]) == 1.0  # both empty after normalisation


def test_chinese_character_level():
    assert chinese_tokens("《战国无双3》，由KOEI开发。") == ["战", "国", "无", "双", "3", "由", "koei", "开", "发"]
    assert exact_match("北京。", ["北京"], "chinese") == 1.0
    # 4 shared characters of 4 predicted and 6 gold: P 1, R 2/3 -> F1 0.8
    assert f1("北京大学", ["北京师范大学"], "chinese") == pytest.approx(0.8)
    assert f1("清华大学", ["北京大学"], "chinese") == pytest.approx(0.5)
    # word-level SQuAD F1 sees one unmatched "word" where character F1 gives partial credit
    assert f1("北京大学", ["北京"], "squad") == 0.0
    assert f1("北京大学", ["北京"], "chinese") == pytest.approx(2 / 3)


def test_group_means_weight_by_items_and_pool_perplexity():
    results = {
        "a": {"metrics": {"accuracy": 1.0}, "items": 30},
        "b": {"metrics": {"accuracy": 0.0}, "items": 10},
        "c": {"metrics": {"perplexity": math.exp(1.0)}, "items": 5, "nll": 100.0, "tokens": 100},
        "d": {"metrics": {"perplexity": math.exp(3.0)}, "items": 5, "nll": 300.0, "tokens": 100},
    }
    groups = group_means(results, {"g": ["a", "b"], "lm": ["c", "d"]})
    assert groups["g"] == {"metrics": {"accuracy": 0.75}, "items": 40, "tasks": ["a", "b"], "stderr": {"accuracy": None}}
    assert groups["lm"]["metrics"]["perplexity"] == pytest.approx(math.exp(2.0)) and groups["lm"]["stderr"] == {"perplexity": None}
    results["a"]["stderr"], results["b"]["stderr"] = {"accuracy": 0.04}, {"accuracy": 0.08}
    # independent tasks: se of the weighted mean = sqrt(sum (n_i / n)^2 se_i^2)
    assert group_means(results, {"g": ["a", "b"]})["g"]["stderr"]["accuracy"] == pytest.approx(
        math.sqrt((30 / 40 * 0.04) ** 2 + (10 / 40 * 0.08) ** 2))


def test_binomial_and_bootstrap_standard_errors():
    import numpy as np

    from stages.eval.metrics import binomial_stderr, bootstrap_stderr, mean_of, perplexity_of

    assert binomial_stderr(0.25, 100) == pytest.approx(math.sqrt(0.25 * 0.75 / 100)) and binomial_stderr(0.5, 0) is None
    rng = np.random.default_rng(0)
    right = (rng.random(400) < 0.3).astype(float).tolist()
    p = sum(right) / len(right)
    boot = bootstrap_stderr(mean_of, [right], iters=2000, seed=1)
    assert boot == bootstrap_stderr(mean_of, [right], iters=2000, seed=1)  # seeded
    assert boot != bootstrap_stderr(mean_of, [right], iters=2000, seed=2)
    assert boot == pytest.approx(binomial_stderr(p, len(right)), rel=0.1)  # the bootstrap of a share agrees
    nll, tokens = rng.uniform(10, 30, 50).tolist(), rng.integers(5, 15, 50).tolist()
    ppl_se = bootstrap_stderr(perplexity_of, [nll, tokens], iters=500)
    assert 0 < ppl_se < math.exp(sum(nll) / sum(tokens))
    assert bootstrap_stderr(mean_of, [[1.0]]) is None and bootstrap_stderr(mean_of, [right], iters=0) is None


def test_chance_and_majority_baselines():
    from stages.eval.metrics import choice_baselines, majority_answer

    assert choice_baselines([2, 4, 4, 2], [0, 1, 1, 1]) == {"chance": pytest.approx(0.375), "majority": 0.75}
    assert majority_answer([["北京。"], ["Paris"], ["北京"], ["beijing"]], "chinese") == "北京。"

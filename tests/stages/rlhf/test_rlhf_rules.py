"""Rule rewards (stages/rlhf/rules.py) on hand-made replies."""

import pytest

from glm.config import ConfigError
from stages.rlhf.config import RewardsConfig
from stages.rlhf.rules import combine, distinct_ngrams, language, rule_scores, same_language


def test_language_is_the_dominant_script_ignoring_role_tokens():
    assert language("<|user|>你好，请介绍一下自己<|assistant|>") == "zh"
    assert language("<|user|>What can you do?") == "en"
    assert language("用 Python 写") == "zh" and language("Write it in 中文") == "en"  # a CJK character weighs a word
    assert language("123 !?") is None
    assert same_language("你好", "你好！") == 1.0 and same_language("你好", "Hello") == 0.0
    assert same_language("Hi", "") == 0.0


def test_rules_scores_and_weights():
    cfg = RewardsConfig(model=1.0, language=0.5, length=0.25, repetition=1.0, format=2.0, min_tokens=2,
                        max_tokens=4, ngram=2)
    assert distinct_ngrams([1, 2, 1, 2, 1, 2], 2) == pytest.approx(2 / 5)
    assert distinct_ngrams([1], 2) == 1.0
    rules = rule_scores(cfg, ["Hi", "你好"], ["Hello", "Hello"], [[1, 2, 3], [1, 2, 1, 2, 1, 2]], [True, False])
    assert rules == {"language": [1.0, 0.0], "length": [1.0, 0.0], "repetition": [1.0, pytest.approx(0.4)],
                     "format": [1.0, 0.0]}
    assert combine(cfg, [0.5, -1.0], rules) == pytest.approx([0.5 + 0.5 + 0.25 + 1.0 + 2.0, -1.0 + 0.4])
    assert list(RewardsConfig(model=0, format=1).rules) == ["format"]
    with pytest.raises(ConfigError):
        RewardsConfig(model=0.0)


def test_the_policy_modes_and_their_config_checks():
    from stages.rlhf.config import PPOConfig, RLHFChainConfig, RLHFConfig

    for mode in ("ppo", "grpo", "rloo", "dpo"):
        RLHFChainConfig(policy=RLHFConfig(output="x", mode=mode))
    with pytest.raises(ConfigError, match="rlhf.policy.mode"):
        RLHFChainConfig(policy=RLHFConfig(output="x", mode="reward"))
    fingerprints = {RLHFConfig(output="x", mode=m).data_fingerprint("b") for m in ("ppo", "grpo", "rloo")}
    assert len(fingerprints) == 1  # the same prompt rows
    for bad in ({"samples_per_prompt": 1}, {"top_k": 5}, {"top_p": 0.9}, {"truncated": "drop"}, {"temperature": 0}):
        with pytest.raises(ConfigError):
            PPOConfig(**bad)

"""Training FLOPs against a hand count (per token, matmuls only, forward x 3 for training)."""

import pytest

from glm.config import preset
from glm.flops import training_flops_per_token


def test_glm_130b_matches_a_hand_count():
    h, f, layers, vocab, seq = 12288, 32768, 70, 150528, 2048
    per_layer = 3 * h * h + h * h + h * (2 * f) + f * h  # qkv, dense, GeGLU in (two halves), out
    assert per_layer == 1_811_939_328
    forward = 2 * layers * per_layer + 2 * h * vocab + layers * 4 * seq * h
    assert forward == 264_417_312_768
    model, hardware = training_flops_per_token(preset("glm_130b"), seq)
    assert model == pytest.approx(3 * forward, rel=1e-12)  # 7.93e11: about 6 x 130B + attention
    assert hardware == model  # no recomputation in the preset
    recompute = 2 * layers * per_layer + layers * 4 * seq * h  # the blocks' forward once more
    _, hfu = training_flops_per_token(preset("glm_130b", activation_checkpointing=True), seq)
    assert hfu == pytest.approx(3 * forward + recompute, rel=1e-12)  # logits are not recomputed


def test_chatglm_6b_matches_a_hand_count_and_uses_the_sequence_length():
    h, f, layers, vocab = 4096, 16384, 28, 130528
    per_layer = 4 * h * h + 2 * h * f  # GELU FFN: in and out of width f
    for seq in (512, 2048):
        forward = 2 * layers * per_layer + 2 * h * vocab + layers * 4 * seq * h
        assert training_flops_per_token(preset("chatglm_6b"), seq)[0] == pytest.approx(3 * forward, rel=1e-12)
    logits_share = 2 * h * vocab / (2 * layers * per_layer + 2 * h * vocab + layers * 4 * 2048 * h)
    assert 0.08 < logits_share < 0.10  # what the old 6N count left out

"""Tensor parallelism of the model library: checkpoint sharding between TP degrees (unit) and
TP=2 against the dense model in two gloo processes (the benchmark's worker)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from glm.config import preset
from glm.model import GLMModel
from glm.parallel import check_divisible, merge_state_dicts, shard_state_dict

STYLES = {"130b": dict(ffn_type="geglu", position_encoding="rope_1d", tie_word_embeddings=True),
          "6b": dict(ffn_type="gelu", position_encoding="rope_2d", tie_word_embeddings=False)}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("size", [2, 4])
def test_shards_merge_back_to_the_dense_state_dict(style, size):
    config = preset("tiny", **STYLES[style])
    state = GLMModel(config).state_dict()
    shards = [shard_state_dict(state, config, r, size) for r in range(size)]
    merged = merge_state_dicts(shards, config)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    h, hd = config.hidden_size, config.head_dim
    qkv = state["layers.0.attention.query_key_value.weight"]
    local = shards[1]["layers.0.attention.query_key_value.weight"]
    heads = config.num_heads // size
    # rank 1 keeps the q, k and v rows of its heads, in the [q; k; v] layout
    for part in range(3):
        rows = slice(part * h + heads * hd, part * h + 2 * heads * hd)
        assert torch.equal(local[part * heads * hd:(part + 1) * heads * hd], qkv[rows])
    assert shards[0]["final_layernorm.weight"] is state["final_layernorm.weight"]  # replicated


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match="num_heads 4 is not divisible"):
        check_divisible(preset("tiny", ffn_hidden_size=384, vocab_size=384), 3)


@pytest.mark.slow
def test_two_gloo_ranks_match_the_dense_model():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/tensor_parallel.py"), "--steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tp"] == 2
    assert result["logits_max_abs_diff"] <= 1e-4 and result["grad_max_abs_diff"] <= 1e-5
    assert result["train_loss_max_rel_diff"] <= 1e-4
    assert result["state_dict_round_trip"] and result["param_bytes_per_rank_ratio"] <= 0.6

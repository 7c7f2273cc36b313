"""Tensor parallelism of the model library: checkpoint sharding between TP degrees, full
precision and quantized (unit), and TP=2 against the dense model in two gloo processes (the
benchmark's worker). TP=2 quantized models against the dense quantized one:
tests/stages/serve/test_serve_tensor_parallel.py."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from glm.config import preset
from glm.model import GLMModel
from glm.int_quant import QuantSpec, quantize_model
from glm.parallel import TPGLMModel, check_divisible, merge_state_dicts, read_shard, shard_state_dict

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
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/tensor_parallel.py"), "--steps", "3", "--no-serve",
                           "--no-engine"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tp"] == 2
    assert result["logits_max_abs_diff"] <= 1e-4 and result["grad_max_abs_diff"] <= 1e-5
    assert result["train_loss_max_rel_diff"] <= 1e-4
    assert result["state_dict_round_trip"] and result["param_bytes_per_rank_ratio"] <= 0.6


QUANT = {"int8": QuantSpec(bits=8), "int4-g16": QuantSpec(bits=4, group_size=16)}


@pytest.mark.parametrize("quant", QUANT)
def test_quantized_shards_merge_back_and_keep_the_dense_scales(quant):
    spec = QUANT[quant]
    config = preset("tiny", **STYLES["130b"])
    state = quantize_model(GLMModel(config), spec).state_dict()
    shards = [shard_state_dict(state, config, r, 2) for r in range(2)]
    merged = merge_state_dicts(shards, config)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
    # a row-parallel layer: each rank holds half of the (packed) integer columns; one scale per
    # row is the same for both halves (replicated), group scales split with their groups
    weight, scale = "layers.0.mlp.dense_4h_to_h.weight", "layers.0.mlp.dense_4h_to_h.weight_scale"
    assert shards[1][weight].shape[1] * 2 == state[weight].shape[1]
    if spec.group_size:
        assert shards[1][scale].shape[1] * 2 == state[scale].shape[1]
    else:
        assert torch.equal(shards[1][scale], state[scale])
    # the TP model of one rank takes the shard as it is
    TPGLMModel(config, _SingleRank(), quantization=spec).load_state_dict(shard_state_dict(state, config, 0, 1))


class _SingleRank:
    """A TP group of one (no process group needed for building a model)."""
    size, rank, group = 1, 0, None


@pytest.mark.parametrize("quant", [None, *QUANT])
def test_read_shard_reads_the_same_slices_from_a_file(quant, tmp_path):
    from safetensors.torch import save_file

    config = preset("tiny", **STYLES["6b" if quant is None else "130b"])
    model = GLMModel(config)
    if quant:
        quantize_model(model, QUANT[quant])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    for rank in range(2):
        read = read_shard(tmp_path / "w.safetensors", config, rank, 2)
        expected = shard_state_dict(state, config, rank, 2)
        assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in read)


def test_quantized_columns_that_do_not_split_into_whole_groups_are_refused():
    config = preset("tiny", hidden_size=64, ffn_hidden_size=256)
    check_divisible(config, 2, QuantSpec(bits=4, group_size=32))
    with pytest.raises(ValueError, match="hidden_size 64 / 4 = 16 columns per rank is not a multiple of 32"):
        check_divisible(config, 4, QuantSpec(bits=4, group_size=32))

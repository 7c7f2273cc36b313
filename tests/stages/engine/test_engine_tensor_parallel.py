"""The engine's tensor parallelism without Ray or DeepSpeed: the process-group layout, config
refusals, which models can be sharded, the layout DeepSpeed's universal checkpoint gets, and
(two gloo processes) the model-parallel unit, a sharded model against the dense one and the
merged export. A TP=2 engine run (Ray Train + DeepSpeed): tests/stages/engine/test_engine.py."""

import re

import pytest
import torch
import torch.multiprocessing as mp

from glm.config import ConfigError, preset
from glm.model import GLMModel
from stages.engine.config import EngineConfig
from stages.engine.parallel import layout, universal_checkpoint_info, unsupported
from stages.rlhf.config import RLHFConfig
from stages.sft.config import MethodConfig, SFTConfig

STYLES = {"130b": dict(ffn_type="geglu", position_encoding="rope_1d", tie_word_embeddings=True),
          "6b": dict(ffn_type="gelu", position_encoding="rope_2d", tie_word_embeddings=False)}


def test_replicas_are_consecutive_ranks_and_data_parallel_groups_stride_across_them():
    assert layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert layout(2, 1) == ([[0], [1]], [[0, 1]])
    with pytest.raises(ValueError, match="3 workers cannot form tensor-parallel groups of 2"):
        layout(3, 2)


def test_config_refuses_what_tensor_parallelism_cannot_do():
    with pytest.raises(ConfigError, match="num_workers 3 is not a multiple of tensor_parallel 2"):
        EngineConfig(num_workers=3, tensor_parallel=2)
    with pytest.raises(ConfigError, match="tensor_parallel 2 needs zero_stage 1 or 2"):
        EngineConfig(num_workers=2, tensor_parallel=2, zero_stage=3)
    with pytest.raises(ConfigError, match="tensor_parallel must be >= 1"):
        EngineConfig(tensor_parallel=0)
    with pytest.raises(ConfigError, match="method.kind 'ptuning'.*P-Tuning v2 prefixes"):
        SFTConfig(output="x", method=MethodConfig(kind="ptuning"),
                  engine=EngineConfig(num_workers=2, tensor_parallel=2))
    with pytest.raises(ConfigError, match="method.kind 'lora'.*LoRA"):
        SFTConfig(output="x", engine=EngineConfig(num_workers=2, tensor_parallel=2))
    SFTConfig(output="x", method=MethodConfig(kind="full"), engine=EngineConfig(num_workers=2, tensor_parallel=2))
    with pytest.raises(ConfigError, match="rlhf: engine.tensor_parallel 2 is not supported"):
        RLHFConfig(output="x", engine=EngineConfig(num_workers=2, tensor_parallel=2))


def test_the_batch_is_counted_in_replicas():
    cfg = EngineConfig(num_workers=4, tensor_parallel=2, micro_batch_size=2, global_batch_size=8)
    assert cfg.data_parallel == 2
    assert cfg.micro_batches_at(0) == 2  # 8 sequences = 2 replicas x 2 rows x 2 micro-batches
    with pytest.raises(ConfigError, match="micro_batch_size 4 x 2 data-parallel workers"):
        EngineConfig(num_workers=4, tensor_parallel=2, micro_batch_size=4, global_batch_size=12)


def test_models_that_cannot_be_sharded_are_named():
    assert unsupported(GLMModel(preset("tiny")), 2) == ""
    assert "num_heads 4 is not divisible" in unsupported(GLMModel(preset("tiny", ffn_hidden_size=384,
                                                                         vocab_size=384)), 3)
    assert "P-Tuning v2" in unsupported(GLMModel(preset("tiny", pre_seq_len=4)), 2)


@pytest.mark.parametrize("style", STYLES)
def test_universal_checkpoint_layout_follows_the_shards(style):
    from deepspeed.checkpoint import constants as c

    config = preset("tiny", num_layers=1, **STYLES[style])
    info = universal_checkpoint_info(GLMModel(config), config, 2)

    def matches(key, name):
        return any(re.match(p, name) for p in info.get(key, []))

    names = [n for n, _ in GLMModel(config).named_parameters()]
    replicated = [n for n in names if matches(c.TP_REPLICATED_PARAMETER_PATTERNS, n)]
    assert sorted(replicated) == sorted(n for n in names if "layernorm" in n or n.endswith(("attention.dense.bias",
                                                                                           "dense_4h_to_h.bias")))
    rows = [n for n in names if matches(c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, n)]
    assert rows == ["layers.0.attention.dense.weight", "layers.0.mlp.dense_4h_to_h.weight"]
    gated = [n for n in names if matches(c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0, n)]
    assert gated == (["layers.0.mlp.dense_h_to_4h.weight", "layers.0.mlp.dense_h_to_4h.bias"]
                     if style == "130b" else [])
    h = config.hidden_size
    fused = {n: s["shape"] for s in info[c.PARAMETER_WITH_SUB_PARAMS] for n in names if re.match(s["patterns"][0], n)}
    assert fused == {"layers.0.attention.query_key_value.weight": ((h, h, h), -1),
                     "layers.0.attention.query_key_value.bias": ((h, h, h),)}
    assert all(w == [[h // 2] * 2] * 3 for w in info[c.SUB_PARAM_SHARD_WIDTHS].values())


def _two_ranks(rank: int, port: int, style: str, results):
    import torch.distributed as dist

    from stages.engine.parallel import ModelParallelUnit, gather_dense_state, tensor_parallel_module

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        config = preset("tiny", num_layers=2, **STYLES[style])
        dense = GLMModel(config)
        mpu = ModelParallelUnit(2, 2, rank)
        shard = tensor_parallel_module(dense, mpu)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=g)
        pos = torch.arange(16).expand(2, 16)
        batch = dict(input_ids=ids, position_ids=pos, block_position_ids=torch.zeros_like(pos),
                     prefix_mask=(pos < 4).long(), labels=torch.roll(ids, -1, 1))
        merged = gather_dense_state(shard, config, mpu)
        with torch.no_grad():
            loss_diff = abs(float(shard(**batch).loss) - float(dense(**batch).loss))
        results[rank] = {
            "ranks": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
                      mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
            "loss_diff": loss_diff,
            "sharded": sorted(n for n, p in shard.named_parameters() if p.tensor_model_parallel),
            "merged_equal": None if merged is None else all(torch.equal(merged[k], v)
                                                            for k, v in dense.state_dict().items()),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("style", ["130b"])
def test_two_gloo_ranks_shard_the_dense_model_and_merge_it_back(style):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_two_ranks, args=(port, style, results), nprocs=2, start_method="spawn")  # not fork: the test process may hold Ray and torch threads
    assert results[0]["ranks"] == (0, 2, 0, 1) and results[1]["ranks"] == (1, 2, 0, 1)
    assert results[0]["loss_diff"] < 1e-5 and results[1]["loss_diff"] < 1e-5
    assert results[0]["merged_equal"] is True and results[1]["merged_equal"] is None  # on the replica's rank 0
    sharded = results[0]["sharded"]
    assert "word_embeddings.weight" in sharded and "layers.0.attention.query_key_value.weight" in sharded
    assert not any("layernorm" in n for n in sharded)

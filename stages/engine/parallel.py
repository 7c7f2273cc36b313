"""Tensor parallelism in the engine: process groups, DeepSpeed's model-parallel unit, the
tensor-parallel model, and what DeepSpeed needs to convert its checkpoints between degrees.

Layout (Megatron-LM's): `world` workers = `tp` x `dp`. The ranks of one tensor-parallel group
are consecutive (replica r holds ranks r*tp ... r*tp + tp - 1), the data-parallel groups
stride across them (ranks j, j + tp, j + 2*tp, ...). Consecutive ranks share a node in Ray
Train and torchrun, so a replica's all-reduces stay inside one node; `check_same_node` makes
sure of it.

DeepSpeed gets a model-parallel unit (`ModelParallelUnit`, the `mpu` of deepspeed.initialize):
ZeRO partitions the optimizer state and all-reduces gradients over the data-parallel group
only, computes the gradient norm once per shard (parameters marked `tensor_model_parallel`)
and names its files mp_rank_XX per tensor-parallel rank. The model carries
`universal_checkpoint_info` (which parameters are replicated, row-parallel, or fused
[q; k; v] / [a; gate] split part by part, exactly as glm.parallel shards them), so DeepSpeed's
universal checkpoint merges a checkpoint of one degree and slices it for another, optimizer
state included.
"""

from __future__ import annotations

import re
import socket

from glm.config import GLMConfig


def layout(world: int, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tensor-parallel groups, data-parallel groups) as lists of global ranks."""
    if tp < 1 or world % tp:
        raise ValueError(f"{world} workers cannot form tensor-parallel groups of {tp}")
    tp_groups = [list(range(r * tp, (r + 1) * tp)) for r in range(world // tp)]
    dp_groups = [list(range(j, world, tp)) for j in range(tp)]
    return tp_groups, dp_groups


class ModelParallelUnit:
    """This rank's tensor- and data-parallel groups, in the interface DeepSpeed's `mpu` expects
    (and Megatron-LM's names). Every rank must construct it at the same time: it creates every
    group (torch.distributed.new_group is collective)."""

    def __init__(self, world: int, tp: int, rank: int):
        import torch.distributed as dist

        tp_groups, dp_groups = layout(world, tp)
        self.tp_size, self.dp_size = tp, world // tp
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_ranks, self.dp_ranks = tp_groups[rank // tp], dp_groups[rank % tp]
        for ranks in tp_groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group = group
        for ranks in dp_groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = group

    # DeepSpeed / Megatron-LM interface
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group


def check_same_node(mpu: ModelParallelUnit) -> None:
    """Collective: refuse a tensor-parallel group spread over several nodes (its all-reduces,
    two per block and step, would cross the network)."""
    import torch.distributed as dist

    hosts = [None] * mpu.tp_size
    dist.all_gather_object(hosts, socket.gethostname(), group=mpu.tp_group)
    if len(set(hosts)) > 1:
        raise RuntimeError(f"tensor-parallel group of ranks {mpu.tp_ranks} spans nodes {sorted(set(hosts))}: each "
                           f"node must hold a multiple of tensor_parallel workers (GPUs per node), so that Ray Train's "
                           f"consecutive ranks of a replica share a node")


def unsupported(model, tp: int) -> str:
    """Why this dense model cannot be trained with `tp` tensor-parallel ranks ("" if it can)."""
    from glm.model import GLMModel
    from glm.parallel import check_divisible

    if type(model) is not GLMModel:
        return (f"the model is a {type(model).__name__}; only the plain GLM model is sharded (the reward / PPO "
                f"value heads are not)")
    if model.config.pre_seq_len:
        return ("P-Tuning v2 prefixes (sft method: ptuning) are not trained under tensor parallelism (served, "
                "yes: train at tensor_parallel 1, serve at N)")
    if any("lora_" in name for name, _ in model.named_parameters()):
        return "LoRA adapters (sft method: lora) are not sharded"
    try:
        check_divisible(model.config, tp)
    except ValueError as e:
        return str(e)
    return ""


def tensor_parallel_module(model, mpu: ModelParallelUnit):
    """This rank's shard of a dense GLM model (the same seed on every rank built the same one),
    with the same trainable parameters, its sharded parameters marked for DeepSpeed, and the
    layout DeepSpeed's universal checkpoint needs to change degrees."""
    from glm.parallel import TPGroup, TPGLMModel, shard_state_dict

    if why := unsupported(model, mpu.tp_size):
        raise ValueError(f"engine tensor_parallel {mpu.tp_size}: {why}; train with tensor_parallel: 1")
    config = model.config
    shard = TPGLMModel(config, TPGroup(mpu.tp_group))
    shard.load_state_dict(shard_state_dict(model.state_dict(), config, mpu.tp_rank, mpu.tp_size))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, p in shard.named_parameters():
        p.requires_grad_(trainable[name])
    shard.train(model.training)
    mark_sharded(shard, config)
    return shard


def mark_sharded(module, config: GLMConfig) -> None:
    """`tensor_model_parallel` on every sharded parameter (DeepSpeed counts the gradient norm of
    a replicated parameter on tensor-parallel rank 0 only, of a shard on every rank)."""
    from glm.parallel import split_layout

    for name, p in module.named_parameters():
        p.tensor_model_parallel = split_layout(name, config, tuple(p.shape)) is not None


def universal_checkpoint_info(module, config: GLMConfig, tp: int) -> dict:
    """DeepSpeed's universal_checkpoint_info for a GLM model (dense or one rank's shard): how
    each trainable parameter's tensor-parallel slices merge, in glm.parallel's layout.
    Replicated: LayerNorms, row-parallel biases (and anything glm.parallel does not split);
    row-parallel: attention.dense and dense_4h_to_h weights (dimension 1); fused parts split
    part by part: [q; k; v] (3 parts) and GeGLU's [a; gate] (2 parts); the rest (embedding,
    output head, GELU's dense_h_to_4h) column-parallel along dimension 0, DeepSpeed's default.
    Only trainable parameters are named (DeepSpeed's strict conversion rejects a pattern that
    matches no optimizer state)."""
    from deepspeed.checkpoint import constants as c

    from glm.parallel import split_layout

    replicated, rows, two_parts, three_parts = [], [], [], {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        how = split_layout(name, config, tuple(p.shape))
        if how is None:
            replicated.append(name)
        elif how == (1, 1):
            rows.append(name)
        elif how[1] == 2:
            two_parts.append(name)
        elif how[1] == 3:
            three_parts.setdefault(p.ndim, []).append(name)

    def pattern(names: list[str]) -> str:
        return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"

    info: dict = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if replicated:
        info[c.TP_REPLICATED_PARAMETER_PATTERNS] = [pattern(replicated)]
    if rows:
        info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = [pattern(rows)]
    if two_parts:
        info[c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = [pattern(two_parts)]
    h = config.hidden_size
    subs, widths = [], {}
    for ndim, names in sorted(three_parts.items()):  # the fused QKV weight (2-D) and bias (1-D)
        p = pattern(names)
        subs.append({"patterns": [p], "shape": ((h, h, h), -1) if ndim == 2 else ((h, h, h),), "partition_dim": 0})
        widths[p] = [[h // tp] * tp for _ in range(3)]
    if subs:
        info[c.PARAMETER_WITH_SUB_PARAMS] = subs
        info[c.SUB_PARAM_SHARD_WIDTHS] = widths
    return info


def gather_dense_state(module, config: GLMConfig, mpu: ModelParallelUnit) -> dict | None:
    """Collective over the tensor-parallel group: the dense (TP=1) state dict on its rank 0,
    None elsewhere."""
    import torch
    import torch.distributed as dist

    from glm.parallel import merge_state_dicts

    mine = {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
    shards = [None] * mpu.tp_size if mpu.tp_rank == 0 else None
    dist.gather_object(mine, shards, dst=mpu.tp_ranks[0], group=mpu.tp_group)
    return merge_state_dicts(shards, config) if mpu.tp_rank == 0 else None

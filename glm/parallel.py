"""Tensor parallelism for the GLM model (Megatron-LM style) over a torch.distributed group.

Each rank of a tensor-parallel group of size N holds 1/N of every block's matrices:

- attention: the fused query/key/value projection split by heads (column-parallel; each rank
  keeps the q, k and v rows of its heads, so its local layout is again [q; k; v]), the output
  projection split by its input columns (row-parallel, one all-reduce);
- FFN: the first projection column-parallel (GeGLU's two halves split alike, so each rank's
  slice is again [a; gate]), the second row-parallel (one all-reduce);
- vocabulary: the embedding split by rows (vocab-parallel: each rank looks up the ids in its
  range, one all-reduce), the output projection (tied or separate) column-parallel, and the
  loss computed by a vocab-parallel cross-entropy without gathering the logits.

LayerNorms, biases of row-parallel layers, RoPE (1D and 2D) and DeepNorm are replicated and
unchanged in meaning. Collectives go through torch.distributed (gloo on CPU, NCCL on GPU).

Weight-only INT8 / INT4 models (glm/int_quant.py) are sharded the same way: integer rows and
their scales split with the rows; a row-parallel layer's integer (or packed INT4) columns split
with the columns, its per-row scales replicated (per-group scales split with their groups), so
every rank's layers dequantize to exactly the dense quantized model's slices.

`shard_state_dict` / `merge_state_dicts` convert between a dense (TP=1) state dict and the
per-rank shards, so checkpoints move between TP degrees; `read_shard` reads one rank's share
from a safetensors file without reading the rest; `tensor_parallel_model` builds one rank's
model from a dense state dict. P-Tuning v2 prefixes: the prefix encoder is replicated and each
rank's attention takes its own heads' slice of the prefix keys and values (enough to serve a
P-tuned model; training one under TP would also need the encoder's gradients summed over the TP
group, which the engine does not do: it refuses). LoRA is not sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from glm.config import GLMConfig
from glm.int_quant import QuantizedLinear, QuantSpec
from glm.model import FeedForward, GLMModel, SelfAttention, WordEmbedding
from glm.schema import IGNORE_INDEX
from kernels.quant_matmul import quantized_matmul


class TPGroup:
    """A tensor-parallel process group (None = the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)


# -- collectives with their gradients ---------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient (the input feeds every rank's shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of partial results); identity gradient."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dimension; the gradient is this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.width = group, dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width].contiguous(), None


def copy_to_tp(x, tp: TPGroup):
    return _CopyToTP.apply(x, tp.group) if tp.size > 1 else x


def reduce_from_tp(x, tp: TPGroup):
    return _ReduceFromTP.apply(x, tp.group) if tp.size > 1 else x


def gather_from_tp(x, tp: TPGroup):
    return _GatherFromTP.apply(x, tp.group) if tp.size > 1 else x


# -- layers -----------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Linear):
    """y_local = x W_local^T + b_local: this rank's slice of the output features."""

    def __init__(self, in_features: int, out_local: int, tp: TPGroup, bias: bool = True):
        super().__init__(in_features, out_local, bias=bias)
        self.tp = tp

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_local W_local^T, then the (replicated) bias."""

    def __init__(self, in_local: int, out_features: int, tp: TPGroup, bias: bool = True):
        super().__init__(in_local, out_features, bias=bias)
        self.tp = tp

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return y + self.bias if self.bias is not None else y


class RowParallelQuantizedLinear(QuantizedLinear):
    """A row-parallel layer with integer weights: this rank's input columns, one all-reduce,
    then the (replicated) bias. Inference only, as QuantizedLinear."""

    def __init__(self, in_local: int, out_features: int, spec: QuantSpec, tp: TPGroup, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__(in_local, out_features, spec, bias, device, dtype)
        self.tp = tp

    def forward(self, x):
        y = quantized_matmul(x, self.weight, self.weight_scale, bits=self.spec.bits, group_size=self.spec.group_size,
                             in_features=self.in_features)
        y = reduce_from_tp(y, self.tp)
        return y + self.bias if self.bias is not None else y


class TPSelfAttention(SelfAttention):
    """Attention over this rank's heads (the parent's forward with local head counts)."""

    def __init__(self, config: GLMConfig, layer_index: int, tp: TPGroup):
        super().__init__(config, layer_index)
        h, local = config.hidden_size, config.hidden_size // tp.size
        self.query_key_value = ColumnParallelLinear(h, 3 * local, tp)
        self.dense = RowParallelLinear(local, h, tp)
        self.local_heads = config.num_heads // tp.size
        self.first_head = tp.rank * self.local_heads

    def forward(self, x, position_ids, block_position_ids, mask, past, prefix=None):
        if prefix is not None:  # P-Tuning v2 keys and values of every head (B, nh, P, hd): this rank's heads
            heads = slice(self.first_head, self.first_head + self.local_heads)
            prefix = (prefix[0][:, heads], prefix[1][:, heads])
        return super().forward(x, position_ids, block_position_ids, mask, past, prefix, heads=self.local_heads)


class TPFeedForward(FeedForward):
    def __init__(self, config: GLMConfig, tp: TPGroup):
        super().__init__(config)
        inner = config.ffn_hidden_size // tp.size
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, 2 * inner if self.gated else inner, tp)
        self.dense_4h_to_h = RowParallelLinear(inner, config.hidden_size, tp)


class VocabParallelEmbedding(WordEmbedding):
    """Rows [start, end) of the vocabulary; with project=True this rank's slice of the logits."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        local = vocab_size // tp.size
        super().__init__(local, hidden_size)
        self.tp, self.start, self.end = tp, tp.rank * local, (tp.rank + 1) * local

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        if project:
            return F.linear(copy_to_tp(x, self.tp), self.weight)
        outside = (x < self.start) | (x >= self.end)
        emb = F.embedding((x - self.start).masked_fill(outside, 0), self.weight)
        return reduce_from_tp(emb.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy per token from vocab-sharded logits (fp32), without gathering them."""

    @staticmethod
    def forward(ctx, logits, labels, start, group):
        logits = logits.float()
        peak = logits.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak.unsqueeze(-1)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        local = labels - start
        mine = (local >= 0) & (local < logits.shape[-1])
        picked = shifted.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(~mine, 0.0)
        dist.all_reduce(picked, group=group)
        softmax = exp / total.unsqueeze(-1)
        ctx.save_for_backward(softmax, local.clamp(0, logits.shape[-1] - 1), mine)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -mine.float().unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TPGroup, start: int) -> torch.Tensor:
    """Mean cross-entropy over labels != IGNORE_INDEX; logits: (..., vocab / tp) of this rank."""
    labels = labels.long()
    valid = labels != IGNORE_INDEX
    per_token = _VocabParallelCrossEntropy.apply(logits, labels.masked_fill(~valid, 0), start, tp.group)
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


class TPGLMModel(GLMModel):
    """One rank's GLM model. Its logits are this rank's vocabulary slice unless gather_logits;
    the loss is the vocab-parallel cross-entropy, equal to the dense model's."""

    def __init__(self, config: GLMConfig, tp: TPGroup, gather_logits: bool = False,
                 quantization: QuantSpec | None = None):
        check_divisible(config, tp.size, quantization)
        with torch.device("meta"):  # the dense modules are replaced below: never allocate them
            super().__init__(config)
        self.tp, self.gather_logits = tp, gather_logits
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        if self.lm_head is not None:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size // tp.size, tp, bias=False)
        for i, block in enumerate(self.layers):
            block.attention = TPSelfAttention(config, i, tp)
            block.mlp = TPFeedForward(config, tp)
            if quantization is not None:  # glm.int_quant.prepare_quantized's layout, split as above
                for module, name in ((block.attention, "query_key_value"), (block.mlp, "dense_h_to_4h")):
                    linear = getattr(module, name)
                    setattr(module, name, QuantizedLinear(linear.in_features, linear.out_features, quantization,
                                                          device="meta"))
                for module, name in ((block.attention, "dense"), (block.mlp, "dense_4h_to_h")):
                    linear = getattr(module, name)
                    setattr(module, name, RowParallelQuantizedLinear(linear.in_features, linear.out_features,
                                                                     quantization, tp, device="meta"))
        self.to_empty(device="cpu")  # the replicated LayerNorms built on meta; values come from a state dict
        for block in self.layers:
            block.attention._inv_freq = SelfAttention(config, 0)._inv_freq

    def output(self, x: torch.Tensor, labels: torch.Tensor | None):
        logits = self.word_embeddings(x, project=True) if self.lm_head is None else self.lm_head(x)
        loss = None
        if labels is not None:
            loss = vocab_parallel_cross_entropy(logits, labels, self.tp, self.word_embeddings.start)
        if self.gather_logits:
            logits = gather_from_tp(logits, self.tp)
        return logits, loss


def check_divisible(config: GLMConfig, tp: int, quantization: QuantSpec | None = None) -> None:
    """ValueError naming the size that `tp` ranks cannot share evenly (with quantized weights
    also: each rank's input columns of a row-parallel layer must be whole INT4 bytes and whole
    scale groups)."""
    if tp < 1:
        raise ValueError(f"tensor parallelism must be >= 1, got {tp}")
    for name, value in (("num_heads", config.num_heads), ("ffn_hidden_size", config.ffn_hidden_size),
                        ("vocab_size", config.vocab_size)):
        if value % tp:
            raise ValueError(f"tensor parallelism {tp}: {name} {value} is not divisible by it")
    if quantization is None or tp == 1:
        return
    unit = max(quantization.group_size, 2 if quantization.bits == 4 else 1)
    for name, value in (("hidden_size", config.hidden_size), ("ffn_hidden_size", config.ffn_hidden_size)):
        if (value // tp) % unit:
            raise ValueError(f"tensor parallelism {tp} with {quantization.name} weights: {name} {value} / {tp} = "
                             f"{value // tp} columns per rank is not a multiple of {unit} "
                             f"({'the scale group size' if quantization.group_size else 'two INT4 values per byte'})")


# -- checkpoints between TP degrees -------------------------------------------------------------


def split_layout(name: str, config: GLMConfig, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(dimension, number of interleaved parts) along which a dense tensor of this name and
    shape is split, or None for a replicated one. Parts: the fused [q; k; v] rows and GeGLU's
    [a; gate] rows are split each on their own, so every rank's slice keeps the same layout.
    Quantized layers: `weight` (integers) and `weight_scale` (fp16, one column per group)
    split like the float weight, except that a row-parallel layer's single per-row scale
    column is replicated."""
    layer, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias", "weight_scale"):
        return None
    if layer.endswith("query_key_value"):
        return 0, 3
    if layer.endswith("dense_h_to_4h"):
        return 0, 2 if config.ffn_type == "geglu" else 1
    if layer.endswith("attention.dense") or layer.endswith("dense_4h_to_h"):
        if kind == "bias" or (kind == "weight_scale" and shape[1] == 1):
            return None
        return 1, 1
    if name in ("word_embeddings.weight", "lm_head.weight"):
        return 0, 1
    return None


def _ranges(length: int, parts: int, rank: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each part's slice that `rank` of `size` holds, along a dimension of `length`."""
    part = length // parts
    local = part // size
    return [(p * part + rank * local, p * part + (rank + 1) * local) for p in range(parts)]


def shard_tensor(name: str, tensor: torch.Tensor, config: GLMConfig, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s share of one dense tensor (the tensor itself when replicated)."""
    how = split_layout(name, config, tuple(tensor.shape))
    if how is None:
        return tensor
    dim, parts = how
    ranges = _ranges(tensor.shape[dim], parts, rank, size)
    return torch.cat([tensor.narrow(dim, a, b - a) for a, b in ranges], dim=dim).clone()


def shard_state_dict(state: dict[str, torch.Tensor], config: GLMConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of a dense state dict."""
    check_divisible(config, size)
    return {name: shard_tensor(name, tensor, config, rank, size) for name, tensor in state.items()}


def read_shard(weights_file, config: GLMConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of a dense safetensors file, reading only the slices it keeps (so
    no process holds the whole model)."""
    from safetensors import safe_open

    check_divisible(config, size)
    out = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            how = split_layout(name, config, tuple(part.get_shape()))
            if how is None:
                out[name] = f.get_tensor(name)
                continue
            dim, parts = how
            ranges = _ranges(part.get_shape()[dim], parts, rank, size)
            pieces = [part[a:b] if dim == 0 else part[:, a:b] for a, b in ranges]
            out[name] = torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]
    return out


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], config: GLMConfig) -> dict[str, torch.Tensor]:
    """The dense state dict from every rank's shard (in rank order)."""
    out = {}
    for name, first in shards[0].items():
        how = split_layout(name, config, tuple(first.shape))
        if how is None:
            out[name] = first
            continue
        dim, parts = how
        per_rank = [s[name].chunk(parts, dim=dim) for s in shards]
        out[name] = torch.cat([torch.cat([r[p] for r in per_rank], dim=dim) for p in range(parts)], dim=dim)
    return out


def tensor_parallel_model(config: GLMConfig, dense_state: dict[str, torch.Tensor], tp: TPGroup,
                          gather_logits: bool = False, quantization: QuantSpec | None = None) -> TPGLMModel:
    """This rank's model loaded with its shard of a dense (TP=1) state dict (a quantized
    model's with `quantization` its spec)."""
    model = TPGLMModel(config, tp, gather_logits=gather_logits, quantization=quantization)
    model.load_state_dict(shard_state_dict(dense_state, config, tp.rank, tp.size))
    return model

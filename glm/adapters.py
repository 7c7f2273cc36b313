"""Parameter-efficient fine-tuning: LoRA on the block projections, and the helpers that turn a
fine-tuned model back into a plain inference model (LoRA merged, P-Tuning v2 MLP folded).

P-Tuning v2 itself lives in the model (`GLMConfig.pre_seq_len`, `glm.model.PrefixEncoder`),
because its prefixes take part in attention; everything here works by module surgery on an
existing `GLMModel`, so the model code does not know about LoRA.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm.model import GLMModel, PrefixEncoder

BLOCK_PROJECTIONS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
"""The four linear layers of a block (attention: qkv, output; FFN: in, out)."""


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x), with A (r, in) and B (out, r); B starts at
    zero, so the wrapped layer starts as exactly the base layer (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the low-rank update added to its weight."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


def apply_lora(model: GLMModel, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] = BLOCK_PROJECTIONS) -> GLMModel:
    """Wrap the named projections of every block in LoRALinear (in place); returns the model."""
    unknown = set(targets) - set(BLOCK_PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(BLOCK_PROJECTIONS)}")
    for block in model.layers:
        for parent in (block.attention, block.mlp):
            for name in targets:
                layer = getattr(parent, name, None)
                if isinstance(layer, nn.Linear):
                    setattr(parent, name, LoRALinear(layer, rank, alpha, dropout))
    return model


class TrainedRows(nn.Module):
    """A frozen embedding (or untied output head) with a few rows trained: the rows of `ids`
    are a parameter of their own (starting at their base values), the rest of the table stays
    the base's. For the chat format's role tokens under LoRA / P-Tuning v2: they never occur in
    pretraining, so their frozen rows are near-identical and the model could not tell user from
    assistant. `merged()` writes the rows into the base table for export."""

    def __init__(self, base: nn.Module, ids: list[int]):
        super().__init__()
        self.base = base
        index = torch.tensor(sorted(set(ids)), dtype=torch.long, device=base.weight.device)
        self.register_buffer("ids", index, persistent=False)
        self.register_buffer("start", base.weight.detach()[index].clone(), persistent=False)
        self.rows = nn.Parameter(self.start.clone())

    @property
    def weight(self) -> torch.Tensor:
        """The base table (its dtype and device are the model's)."""
        return self.base.weight

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        delta = self.rows - self.start
        if project or isinstance(self.base, nn.Linear):  # hidden -> logits: the rows' logits corrected
            out = self.base(x, project=True) if project else self.base(x)
            return out.index_add(-1, self.ids, F.linear(x, delta))
        out = self.base(x)  # ids -> vectors: where x is one of the ids, its row's change added
        hit = (x.unsqueeze(-1) == self.ids).to(delta.dtype)
        return out + hit @ delta

    @torch.no_grad()
    def merged(self) -> nn.Module:
        self.base.weight[self.ids] = self.rows.to(self.base.weight.dtype)
        return self.base


def train_rows(model: GLMModel, ids: list[int]) -> GLMModel:
    """Train the embedding rows (and a separate output head's rows) of `ids` (in place)."""
    if ids:
        model.word_embeddings = TrainedRows(model.word_embeddings, ids)
        if model.lm_head is not None:
            model.lm_head = TrainedRows(model.lm_head, ids)
    return model


def merge_lora(model: GLMModel) -> GLMModel:
    """Replace every LoRALinear by its merged nn.Linear and every TrainedRows by its base table
    (in place); returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, TrainedRows)):
                setattr(module, name, child.merged())
    return model


@torch.no_grad()
def fold_prefix_projection(model: GLMModel) -> GLMModel:
    """P-Tuning v2 with reparameterisation trains embedding -> MLP; inference needs only the
    MLP's output. Replace the encoder by a plain prefix table with the same values (in place)
    and set `config.prefix_projection = False`, so the exported checkpoint is small and the
    model computes the same logits."""
    encoder = model.prefix_encoder
    if encoder is None or encoder.trans is None:
        return model
    values = encoder.trans(encoder.embedding.weight)  # (pre_seq_len, 2 * layers * hidden)
    model.config = dataclasses.replace(model.config, prefix_projection=False, prefix_hidden_size=0)
    folded = PrefixEncoder(model.config).to(device=values.device, dtype=values.dtype)
    folded.embedding.weight.copy_(values)
    model.prefix_encoder = folded
    return model


def freeze_all_but(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """requires_grad only for parameters whose name contains one of `trainable` (all if empty)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not trainable or any(t in name for t in trainable))


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on a meta-device model (no memory)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

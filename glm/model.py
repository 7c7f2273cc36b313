"""The GLM transformer (GLM-130B / ChatGLM-6B family) in plain PyTorch.

- DeepNorm post-LN as in GLM-130B and ChatGLM-6B: each sub-layer normalises its input and
  adds it back scaled by alpha = (2N)^0.5: y = LN(x); x' = y * alpha + f(y); a final
  LayerNorm after the last block. Xavier-normal init with gain (2N)^-0.5 on the value,
  attention-output and FFN weights, gain 1 on query and key.
- RoPE 1D (GLM-130B) or 2D (ChatGLM: half of each head by position, half by block position).
- Embedding gradient shrink: emb * a + emb.detach() * (1 - a).
- Attention through kernels.attention (FP32-softmax scaling in the reference path), with the
  sample schema's rule as the mask, a KV cache for decoding, and activation checkpointing.
- P-Tuning v2 (config.pre_seq_len > 0): trainable key/value prefixes in every layer that
  every token attends to. They are not rotated and not part of the KV cache, so callers
  (generation, serving, evaluation) never see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from glm.config import GLMConfig
from glm.schema import IGNORE_INDEX, attention_mask
from kernels.attention import attention
from kernels.rope import apply_rope, apply_rope_2d, rope_inv_freq

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v (B, nh, T, hd)


@dataclass
class GLMOutput:
    logits: torch.Tensor  # (B, T, vocab), fp32 when computing the loss
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, 3 * h)  # rows: [q; k; v]
        self.dense = nn.Linear(h, h)
        # Not a buffer: model.to(bf16) must not round the frequencies, and a model built on
        # the meta device still gets real values. Moved to the activations' device on use.
        rotary_dim = config.head_dim // 2 if config.uses_2d_positions else config.head_dim
        self._inv_freq = rope_inv_freq(rotary_dim, config.rope_base, device="cpu")
        if config.rope_fp16_frequencies:  # ChatGLM-6B's RotaryEmbedding: inv_freq.half()
            self._inv_freq = self._inv_freq.half().float()

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def forward(self, x, position_ids, block_position_ids, mask, past: tuple | None, prefix: tuple | None = None,
                heads: int | None = None):
        """prefix: P-Tuning v2 keys and values (B, nh, P, hd), visible to every query; the
        mask then covers P + cached + new keys. The returned cache excludes the prefix.
        heads: the heads this module holds (fewer under tensor parallelism; glm/parallel.py)."""
        B, T, _ = x.shape
        nh, hd = heads or self.config.num_heads, self.config.head_dim
        qkv = self.query_key_value(x).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        inv_freq = self.inv_freq(x.device)
        if self.config.uses_2d_positions:
            q = apply_rope_2d(q, position_ids, block_position_ids, inv_freq)
            k = apply_rope_2d(k, position_ids, block_position_ids, inv_freq)
        else:
            q = apply_rope(q, position_ids, inv_freq)
            k = apply_rope(k, position_ids, inv_freq)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        if prefix is not None:
            k = torch.cat((prefix[0], k), dim=2)
            v = torch.cat((prefix[1], v), dim=2)
        y = attention(
            q, k, v, mask,
            layer_index=self.layer_index,
            fp32_softmax_scaling=self.config.attention_softmax_fp32_scaling,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.dense(y), present


class FeedForward(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.gated = config.ffn_type == "geglu"
        inner = config.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * inner if self.gated else inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, x):
        x = self.dense_h_to_4h(x)
        if self.gated:
            a, gate = x.chunk(2, dim=-1)
            x = a * F.gelu(gate)
        else:
            x = F.gelu(x, approximate="tanh")
        return self.dense_4h_to_h(x)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, layer_index: int):
        super().__init__()
        self.alpha = config.deepnorm_alpha
        self.pre_ln = config.residual == "pre_ln"
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.attention = SelfAttention(config, layer_index)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, position_ids, block_position_ids, mask, past=None, prefix=None):
        if self.pre_ln:
            attn, present = self.attention(self.input_layernorm(x), position_ids, block_position_ids, mask, past, prefix)
            x = x + self.dropout(attn)
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x))), present
        y = self.input_layernorm(x)
        attn, present = self.attention(y, position_ids, block_position_ids, mask, past, prefix)
        x = y * self.alpha + self.dropout(attn)
        y = self.post_attention_layernorm(x)
        x = y * self.alpha + self.dropout(self.mlp(y))
        return x, present


class WordEmbedding(nn.Embedding):
    """The input embedding; with tied weights also the output projection.

    Both uses go through this module's forward, so a sharded runtime (DeepSpeed ZeRO-3) that
    gathers a module's parameters around its forward sees every use of the weight.
    """

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if project else super().forward(x)


class PrefixEncoder(nn.Module):
    """P-Tuning v2 (ChatGLM-6B's ptuning): pre_seq_len trainable key/value pairs per layer,
    either a table of their values or, with prefix_projection, an embedding through an MLP."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        width = 2 * config.num_layers * config.hidden_size
        if config.prefix_projection:
            inner = config.prefix_hidden_size or config.hidden_size
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, inner), nn.Tanh(), nn.Linear(inner, width))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)
            self.trans = None

    def forward(self) -> torch.Tensor:
        """All prefixes as one tensor (num_layers, 2, num_heads, pre_seq_len, head_dim)."""
        c = self.config
        # through the embedding's forward, so ZeRO-3 gathers its weight
        x = self.embedding(torch.arange(c.pre_seq_len, device=self.embedding.weight.device))
        if self.trans is not None:
            x = self.trans(x)
        return x.view(c.pre_seq_len, c.num_layers, 2, c.num_heads, c.head_dim).permute(1, 2, 3, 0, 4)


class GLMModel(nn.Module):
    """GLM language model: token ids in, next-token (Part-B target) logits out."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = WordEmbedding(config.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DeepNorm initialisation (GLM_SPEC.md section 3)."""
        c = self.config
        beta, h = c.deepnorm_beta, c.hidden_size
        nn.init.normal_(self.word_embeddings.weight, std=c.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=c.init_std)
        for block in self.layers:
            qkv = block.attention.query_key_value.weight  # (3h, h)
            nn.init.xavier_normal_(qkv[:h], gain=1.0)
            nn.init.xavier_normal_(qkv[h:2 * h], gain=1.0)
            nn.init.xavier_normal_(qkv[2 * h:], gain=beta)
            nn.init.xavier_normal_(block.attention.dense.weight, gain=beta)
            nn.init.xavier_normal_(block.mlp.dense_h_to_4h.weight, gain=beta)
            nn.init.xavier_normal_(block.mlp.dense_4h_to_h.weight, gain=beta)
            for linear in (block.attention.query_key_value, block.attention.dense,
                           block.mlp.dense_h_to_4h, block.mlp.dense_4h_to_h):
                nn.init.zeros_(linear.bias)
        if self.prefix_encoder is not None:  # small prefixes: the base model's behaviour at the start
            nn.init.normal_(self.prefix_encoder.embedding.weight, std=c.init_std)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.word_embeddings(input_ids)
        a = self.config.embedding_grad_shrink
        if a < 1.0 and torch.is_grad_enabled():
            emb = emb * a + emb.detach() * (1.0 - a)  # same value, gradient scaled by a
        return emb

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> GLMOutput:
        """input_ids, position_ids, block_position_ids, labels: (B, T) for the new tokens.

        segment_ids, prefix_mask: (B, T_past + T), covering cached and new tokens; default is
        one segment with no prefix (a causal LM). Returns logits for the new tokens.
        """
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if segment_ids is None:
            segment_ids = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
        if prefix_mask is None:
            prefix_mask = torch.zeros_like(segment_ids)
        if segment_ids.shape[1] != past_len + T:
            raise ValueError(
                f"segment_ids cover {segment_ids.shape[1]} tokens; expected {past_len + T} "
                f"({past_len} cached + {T} new)"
            )
        if block_position_ids is None:
            block_position_ids = torch.zeros_like(position_ids)
        mask = attention_mask(segment_ids, prefix_mask, num_queries=T)
        prefixes = None
        if self.prefix_encoder is not None:
            prefixes = self.prefix_encoder().to(self.word_embeddings.weight.dtype)
            visible = torch.ones(B, 1, T, self.config.pre_seq_len, dtype=torch.bool, device=mask.device)
            mask = torch.cat((visible, mask), dim=-1)

        x = self.embedding_dropout(self.embed(input_ids))
        presents: KVCache = []
        checkpointing = self.config.activation_checkpointing and self.training and not use_cache
        for i, block in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            prefix = None
            if prefixes is not None:
                prefix = (prefixes[i, 0].expand(B, -1, -1, -1), prefixes[i, 1].expand(B, -1, -1, -1))
            if checkpointing:
                x, present = torch.utils.checkpoint.checkpoint(
                    block, x, position_ids, block_position_ids, mask, past, prefix, use_reentrant=False
                )
            else:
                x, present = block(x, position_ids, block_position_ids, mask, past, prefix)
            if use_cache:
                presents.append(present)
        logits, loss = self.output(self.final_layernorm(x), labels)
        return GLMOutput(logits=logits, loss=loss, past_key_values=presents if use_cache else None)

    def output(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, vocab), mean cross-entropy over labels != IGNORE_INDEX in fp32 or None)."""
        logits = self.word_embeddings(x, project=True) if self.lm_head is None else self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX
            )
        return logits, loss


def model_device(model) -> torch.device:
    """Where a model's inputs go: `model.device` when the model says (a tensor-parallel driver
    whose weights live in other processes), else its first parameter's device."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` padded with zeros at the start of `dim` to `length`."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat((t.new_zeros(shape), t), dim=dim)


def select_cache(cache, index: torch.Tensor, first: int = 0):
    """Rows `index` of a KV cache, from key column `first` on (the beams kept, the rows still
    decoding). A cache that is not a list of tensors (one held by tensor-parallel workers)
    does this itself."""
    if not isinstance(cache, list):
        return cache.select(index, first)
    return [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:]) for k, v in cache]


def concat_caches(a, b, length: int):
    """The rows of KV cache `a`, then those of `b`, each left-padded to `length` key columns
    (zeros: the caller's segment ids must make them invisible). A cache that is not a list
    of tensors does this itself."""
    if not isinstance(a, list):
        return a.concat(b, length)
    return [(torch.cat((left_pad(k0, length, 2), left_pad(k1, length, 2))),
             torch.cat((left_pad(v0, length, 2), left_pad(v1, length, 2)))) for (k0, v0), (k1, v1) in zip(a, b)]


@dataclass
class ParameterCount:
    total: int
    """Every distinct parameter tensor."""
    embedding: int
    """The input embedding table."""
    output_head: int
    """A separate (untied) lm_head; 0 when tied."""

    @property
    def reported(self) -> int:
        """The convention of the GLM papers: the output projection counted once (as the
        embedding), so ChatGLM-6B's separate lm_head is not added again (6.2B)."""
        return self.total - self.output_head

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output_head


def count_parameters(config: GLMConfig) -> ParameterCount:
    """Count a config's parameters by building the model on the meta device (no memory)."""
    with torch.device("meta"):
        model = GLMModel(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    head = model.lm_head.weight.numel() if model.lm_head is not None else 0
    return ParameterCount(total=total, embedding=model.word_embeddings.weight.numel(), output_head=head)

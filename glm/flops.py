"""Training FLOPs of the GLM architecture per token, for MFU and HFU.

Counted from the matrix multiplications (elementwise work is left out, as in PaLM's
appendix B and Megatron's MFU): per layer the fused query/key/value and output projections,
the FFN (GeGLU's first projection is twice as wide), and attention's scores and weighted sum
over the actual sequence length; then the output logits. A training step is 3x the forward
(the backward computes gradients for inputs and weights); activation recomputation runs
every block's forward once more, which counts in hardware FLOPs (HFU) but not in model FLOPs (MFU).
"""

from __future__ import annotations

from glm.config import GLMConfig


def forward_flops_per_token(config: GLMConfig, seq_len: int) -> tuple[float, float]:
    """(transformer blocks, output logits) forward FLOPs per token at this sequence length."""
    h, f = config.hidden_size, config.ffn_hidden_size
    gated = config.ffn_type.endswith("glu")
    matmul_params = 4 * h * h + h * (2 * f if gated else f) + f * h  # qkv, dense, FFN in, FFN out
    attention = 2 * (2 * seq_len * h)  # scores Q K^T and probabilities x V, each seq_len x h per token
    blocks = config.num_layers * (2 * matmul_params + attention)
    return float(blocks), float(2 * h * config.vocab_size)


def training_flops_per_token(config: GLMConfig, seq_len: int) -> tuple[float, float]:
    """(model FLOPs for MFU, hardware FLOPs for HFU) per trained token."""
    blocks, logits = forward_flops_per_token(config, seq_len)
    model = 3 * (blocks + logits)
    return model, model + (blocks if config.activation_checkpointing else 0.0)

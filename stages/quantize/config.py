"""Typed config of the quantize stage (`python -m stages.quantize --config FILE`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glm.config import ConfigError
from stages.tracking import TrackingConfig


@dataclass
class GateConfig:
    """The quality gate: perplexity of the original, INT8 and INT4 models on held-out text."""

    enabled: bool = True
    """Measure perplexities and fail the stage when the output's increase passes the limit."""
    text: str = "data/sample/heldout/*.jsonl"
    """Held-out text the model did not train on (default: the shipped sample's held-out slice): JSONL file(s) with a `text` field, or plain text file(s); path, glob or URI.
    Documents are taken from the end of each file, round-robin, until `max_tokens`."""
    max_tokens: int = 16384
    """Tokens of text scored (per model)."""
    window: int = 256
    """Tokens per scored window (capped at the model's max_seq_len - 1). Each window is a
    [gMASK] sample: its first quarter is bidirectional context, the rest is predicted."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_ppl_increase: float = 0.10
    """Largest allowed relative perplexity increase of the output (0.10 = +10% over the original)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.window < 8 or self.batch_size < 1:
            raise ConfigError("gate: max_tokens >= 1, window >= 8 and batch_size >= 1 are required")
        if self.max_ppl_increase < 0:
            raise ConfigError(f"gate.max_ppl_increase must be >= 0, got {self.max_ppl_increase}")


@dataclass
class QuantizeConfig:
    """Quantize an inference checkpoint to INT8 or INT4 weights (GLM-130B's weight-only scheme)."""

    output: str
    """Where the quantized inference checkpoint (same layout as the input) is written."""
    checkpoint: str = ""
    """The full-precision inference checkpoint to quantize (path or URI); a pipeline fills it in."""
    bits: Literal[4, 8] = 4
    """Integer width of the output's linear weights."""
    group_size: int = 0
    """0: one fp16 scale per output row (GLM-130B); else per row and group of this many input
    columns (e.g. 128): more scales, smaller error."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the gate's models run: auto = CUDA when available (the Triton kernels), else CPU."""
    gate: GateConfig = field(default_factory=GateConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["First Citizen:\n", "话说天下大势，[MASK]"])
    """Texts the quantized model completes (greedy, logged to MLflow) to show it still generates."""
    sample_max_new_tokens: int = 32
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.group_size < 0 or self.group_size % 2:
            raise ConfigError(f"group_size must be 0 (per row) or a positive even number, got {self.group_size}")

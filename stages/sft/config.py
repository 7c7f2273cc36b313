"""Typed config of the SFT stage (`python -m stages.sft --config FILE`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from glm.chat_format import FORMATS as CHAT_FORMATS
from glm.config import ConfigError
from stages.engine.config import EngineConfig
from stages.tracking import TrackingConfig

FORMATS = ("auto", "alpaca", "conversations", "messages")


@dataclass
class SFTSource:
    """One file set of instruction / dialogue data (JSONL, local path, glob or URI)."""

    uri: str
    """Path, glob or URI of JSONL files."""
    format: Literal["auto", "alpaca", "conversations", "messages"] = "auto"
    """Row shape: `alpaca` (instruction, input, output, optional history [[q, a], ...]),
    `conversations` (ShareGPT: [{from: human|gpt, value}]), `messages` (OpenAI:
    [{role: system|user|assistant|tool, content, tool_calls, tool_call_id}], with an optional
    row-level `tools` list), or `auto` (recognised per row)."""
    name: str = ""
    """Name in the manifest and MLflow (default: the file stem of the uri)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"SFTSource.format must be one of {FORMATS}, got {self.format!r}")
        if not self.name:
            self.name = self.uri.rstrip("/").rsplit("/", 1)[-1].split(".")[0].replace("*", "x")


@dataclass
class SFTDataConfig:
    """How conversations become rows of the sample schema."""

    sources: list[SFTSource] = field(default_factory=list)
    seq_len: int = 512
    """Row length; also the longest prompt + response (prompts are cut from the left)."""
    train_on: Literal["all_turns", "last_turn"] = "all_turns"
    """Every assistant turn becomes a sample (with the earlier rounds as its history), or only
    the last one of each conversation."""
    reply_max_tokens: int = 0
    """Cut every assistant reply longer than this many tokens after its last sentence end within
    the limit (a full stop, question or exclamation mark, or a line break); a conversation with a
    reply that has no sentence end within it is left out, counted as `reply_too_long`. 0: replies
    whole. A small model trained on replies it can finish learns to end its turn."""
    pack: bool = True
    """Pack several short samples into one row (separate segments) instead of one per row."""
    validation_fraction: float = 0.05
    """Share of conversations held out for validation loss (by content hash)."""
    max_samples: int = 0
    """Use at most this many conversations per source (0 = all): for quick runs."""
    output: str = ""
    """Where the prepared rows go (default: `<stage output>_data`)."""
    seed: int = 0
    chat_format: str = ""
    """How conversations are rendered (`glm.chat_format`): `chatglm_6b` (ChatGLM-6B's
    `[Round N]` prompt; no system role, no tools) or `roles` (role tokens, system prompts, tool
    calls; needs a tokenizer with the role tokens). Empty: the base checkpoint's recorded
    format, else `chatglm_6b`. Recorded in the fine-tuned checkpoint."""

    def __post_init__(self) -> None:
        if self.chat_format and self.chat_format not in CHAT_FORMATS:
            raise ConfigError(f"SFTDataConfig.chat_format must be one of {CHAT_FORMATS} (or empty: the base's), "
                              f"got {self.chat_format!r}")
        if self.seq_len < 16:
            raise ConfigError(f"SFTDataConfig.seq_len must be >= 16, got {self.seq_len}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"SFTDataConfig.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.reply_max_tokens < 0:
            raise ConfigError(f"SFTDataConfig.reply_max_tokens must be >= 0, got {self.reply_max_tokens}")
        if self.train_on not in ("all_turns", "last_turn"):
            raise ConfigError(f"SFTDataConfig.train_on must be 'all_turns' or 'last_turn', got {self.train_on!r}")


@dataclass
class MethodConfig:
    """Which parameters SFT trains."""

    kind: Literal["full", "ptuning", "lora"] = "lora"
    """`full` fine-tuning, `ptuning` (P-Tuning v2: per-layer key/value prefixes, base frozen)
    or `lora` (low-rank updates of the block projections, base frozen, merged at export)."""
    pre_seq_len: int = 128
    """P-Tuning v2: prefix length."""
    train_role_tokens: bool = True
    """LoRA / P-Tuning v2: also train the embedding rows (and a separate output head's rows) of
    the chat format's role tokens (`roles` format): they never occur in pretraining, and frozen
    they are near-identical, so the model could not tell user from assistant. `full` trains them
    anyway."""
    prefix_projection: bool = False
    """P-Tuning v2: reparameterise the prefixes through a 2-layer MLP (folded at export)."""
    prefix_hidden_size: int = 0
    """P-Tuning v2: width of that MLP (0 = hidden size)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    """Block projections that get LoRA (attention: query_key_value, dense; FFN: dense_h_to_4h, dense_4h_to_h)."""

    def __post_init__(self) -> None:
        if self.kind not in ("full", "ptuning", "lora"):
            raise ConfigError(f"MethodConfig.kind must be 'full', 'ptuning' or 'lora', got {self.kind!r}")
        if self.kind == "ptuning" and self.pre_seq_len <= 0:
            raise ConfigError(f"MethodConfig.pre_seq_len must be positive for ptuning, got {self.pre_seq_len}")
        if self.kind == "lora" and self.lora_rank <= 0:
            raise ConfigError(f"MethodConfig.lora_rank must be positive for lora, got {self.lora_rank}")


@dataclass
class SFTConfig:
    """Chat fine-tuning of a pretrained inference checkpoint on the training engine."""

    output: str
    """Where the fine-tuned inference checkpoint goes."""
    base: str = ""
    """The inference checkpoint to start from (path or URI): the pretraining stage's, which a
    pipeline fills in, or published weights imported with `python -m glm.chatglm_hf import`
    (docs/interop.md). Its tokenizer is used for the data."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """GLMConfig fields to change for fine-tuning (e.g. hidden_dropout, activation_checkpointing)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["你好", "What can you do?"])
    """Chat prompts answered by the fine-tuned model at the end, logged to MLflow."""
    max_new_tokens: int = 64
    """Length limit of those sample answers."""

    def __post_init__(self) -> None:
        if self.engine.tensor_parallel > 1 and self.method.kind != "full":
            raise ConfigError(f"sft: engine.tensor_parallel {self.engine.tensor_parallel} with method.kind "
                              f"{self.method.kind!r}: tensor parallelism does not shard "
                              f"{'P-Tuning v2 prefixes' if self.method.kind == 'ptuning' else 'LoRA adapters'} "
                              f"yet; use method.kind 'full' or engine.tensor_parallel: 1")

    def data_fingerprint(self, base_identity: str) -> str:
        """Hash of everything the prepared rows depend on (data config + base tokenizer/model shape)."""
        d = asdict(self.data)
        d.pop("output")
        blob = json.dumps({"data": d, "base": base_identity}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

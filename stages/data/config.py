"""Typed config of the data stage (`python -m stages.data --config FILE`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from glm.config import ConfigError
from stages.data.decontam import DecontamConfig
from stages.data.dedup import DedupConfig
from stages.data.langid import LanguageConfig
from stages.data.quality import QualityConfig
from stages.tracking import TrackingConfig


@dataclass
class CorpusSource:
    """One corpus: files of documents."""

    uri: str
    """Path, glob or URI (s3://bucket/prefix/*.jsonl) of JSONL, Parquet or plain-text files."""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """File format; auto = from the extension (.jsonl/.json, .parquet, anything else = text)."""
    text_field: str = "text"
    """Field holding the document (JSONL, Parquet). Plain text: one document per line."""
    language: str = "en"
    """Language tag, reported in the manifest and checked by language identification ("en", "zh";
    "en,zh" accepts either; "any" or "mixed" turns the check off for this source)."""
    weight: float = 1.0
    """Sampling weight: 2.0 uses every document twice, 0.5 a deterministic half."""
    name: str = ""
    """Name in the manifest; default: the URI."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"source {self.uri}: weight must be >= 0, got {self.weight}")
        self.name = self.name or self.uri


@dataclass
class CleanConfig:
    """Per-document cleaning and filters."""

    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form applied to every document."""
    min_chars: int = 20
    """Shorter documents (after cleaning) are rejected as too_short."""
    max_chars: int = 2_000_000
    """Longer documents are rejected as too_long."""


@dataclass
class TokenizerSettings:
    """Train the SentencePiece unigram tokenizer, or reuse one."""

    path: str = ""
    """A tokenizer.model (or a directory holding one) to reuse instead of training."""
    vocab_size: int = 32000
    """Pieces in a trained tokenizer."""
    sample_chars: int = 50_000_000
    """About this many characters of cleaned text (a deterministic, hash-selected sample) train it."""
    character_coverage: float = 0.9995
    """SentencePiece character coverage (lower it for a small vocab on Chinese text)."""


@dataclass
class ObjectiveConfig:
    """GLM blank infilling (GLM_SPEC.md section 1)."""

    seq_len: int = 2048
    """Tokens per output row."""
    mask_window: int = 512
    """Length of one [MASK] sample; seq_len / mask_window of them are packed per row."""
    mask_sequence_share: float = 0.3
    """Share of rows built from [MASK] samples; the rest are [gMASK] rows."""
    mask_coverage: float = 0.15
    """Share of a [MASK] window's tokens covered by spans."""
    poisson_lambda: float = 3.0
    """Mean of the Poisson span-length distribution."""
    max_span: int = 39
    """Longest [MASK] span."""
    min_gmask_ratio: float = 0.2
    """Shortest masked suffix of a [gMASK] row, as a share of its text."""
    max_gmask_ratio: float = 1.0
    """Longest masked suffix share ([gMASK] suffix ratio ~ U(min, max))."""
    position_encoding: Literal["rope_1d", "rope_2d"] = "rope_2d"
    """1D positions (GLM-130B) or 2D positions (GLM-10B, ChatGLM); must match the model."""

    def __post_init__(self) -> None:
        if self.seq_len % self.mask_window:
            raise ConfigError(f"objective.seq_len {self.seq_len} must be a multiple of mask_window {self.mask_window}")
        if not 0.0 <= self.mask_sequence_share <= 1.0:
            raise ConfigError(f"objective.mask_sequence_share must be in [0, 1], got {self.mask_sequence_share}")
        if not 0.0 < self.mask_coverage < 0.5:
            raise ConfigError(f"objective.mask_coverage must be in (0, 0.5), got {self.mask_coverage}")
        if not 0.0 < self.min_gmask_ratio <= self.max_gmask_ratio <= 1.0:
            raise ConfigError("objective: need 0 < min_gmask_ratio <= max_gmask_ratio <= 1")
        if self.mask_window < 16:
            raise ConfigError(f"objective.mask_window must be >= 16, got {self.mask_window}")

    @property
    def use_2d(self) -> bool:
        return self.position_encoding == "rope_2d"


@dataclass
class MIPDataset:
    """One labelled dataset turned into prompted samples."""

    uri: str
    """JSONL file(s) of labelled rows (path, glob or URI)."""
    templates: str
    """PromptSource-style YAML: Jinja templates with '|||' between prompt and answer."""
    adapter: str = "identity"
    """Row converter to the fields the templates expect (see stages.data.mip.ADAPTERS)."""
    cap: int = 100_000
    """Most samples taken from this dataset (GLM-130B: 100k per PromptSource dataset)."""
    name: str = ""
    """Name in the manifest; default: the URI."""

    def __post_init__(self) -> None:
        self.name = self.name or self.uri


@dataclass
class MIPConfig:
    """Multi-task instruction pretraining data mixed into the training rows."""

    datasets: list[MIPDataset] = field(default_factory=list)
    token_share: float = 0.05
    """Target share of training tokens (non-padding) from MIP rows."""
    warmup_rows: int = 0
    """Ramp the MIP rate linearly from 0 over the first this many training rows."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.token_share < 1.0:
            raise ConfigError(f"mip.token_share must be in [0, 1), got {self.token_share}")


@dataclass
class DataConfig:
    """The data stage: corpora and MIP sets in, Parquet shards of the sample schema out."""

    sources: list[CorpusSource]
    output: str
    """Output directory (path or URI): train/, validation/, tokenizer.model, manifest.json."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    mip: MIPConfig = field(default_factory=MIPConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    decontamination: DecontamConfig = field(default_factory=DecontamConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    rejected_samples: int = 20
    """Rejected documents (first 1000 characters) written per rule to rejected/<rule>.jsonl."""
    validation_fraction: float = 0.01
    """Share of documents (chosen by content hash) held out for the validation split."""
    num_buckets: int = 16
    """Documents are spread over this many hash buckets, each packed independently (parallelism)."""
    rows_per_shard: int = 1000
    """Rows per output Parquet file."""
    seed: int = 1234
    """Every sample's randomness derives from this and the sample's index."""
    workers: int = 2
    """Concurrent Ray tasks of the placement and tokenization step (does not change the output)."""
    driver_bytes: int = 8 << 20
    """When the tokenized corpus is smaller than this (bytes), its per-group steps (rows, MIP,
    shards, baselines) run in the driver instead of Ray tasks: a near-empty corpus spares the
    start of worker processes. 0: always tasks. Does not change the output."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data config: sources is empty")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.num_buckets < 1 or self.rows_per_shard < 1 or self.workers < 1:
            raise ConfigError("num_buckets, rows_per_shard and workers must be >= 1")

    def fingerprint(self) -> str:
        """Hash of everything that determines the output (not where it goes or how many workers)."""
        data = asdict(self)
        for key in ("output", "workers", "driver_bytes", "tracking"):
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

"""A small data-stage output built from the shipped sample corpus, for the training benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_sample_data(work: Path, seq_len: int, files: str = "en_*.jsonl", vocab_size: int = 4000) -> str:
    """Run the real data stage on data/sample/pretrain/<files>; returns the output path."""
    from stages.data.config import CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings
    from stages.data.stage import run

    cfg = DataConfig(
        sources=[CorpusSource(uri=str(REPO / "data/sample/pretrain" / files))], output=str(work / "data"),
        tokenizer=TokenizerSettings(vocab_size=vocab_size), mip=MIPConfig(token_share=0.0),
        objective=ObjectiveConfig(seq_len=seq_len, mask_window=seq_len // 4), num_buckets=4,
        validation_fraction=0.02)
    return run(cfg)

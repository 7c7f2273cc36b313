"""Quantize stage: INT8 / INT4 weight-only checkpoints with a perplexity quality gate (`python -m stages.quantize`)."""

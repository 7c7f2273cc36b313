"""Shared fixtures. Tiers: unit (default), `integration` (a stage end to end on tiny data,
real Ray / DeepSpeed / MLflow, one shared Ray instance), `gpu` (skipped without CUDA)."""

from __future__ import annotations

import contextlib
import json
import itertools
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def sample_texts(n_per_file: int = 6) -> list[str]:
    """A bilingual handful of documents from the shipped sample corpus."""
    texts = []
    for path in sorted((SAMPLE / "pretrain").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in itertools.islice(f, n_per_file)]
    return texts


@pytest.fixture(scope="session")
def tokenizer():
    """A small tokenizer trained on the sample corpus (about a second)."""
    from glm.tokenizer import train_tokenizer

    return train_tokenizer(sample_texts(), vocab_size=3000, character_coverage=0.995)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def small_ray_data_blocks(max_bytes: int = 16 << 10):
    """Ray Data cuts its blocks at `max_bytes` inside the block: every step sees another
    partitioning of the same rows than with the default (128 MiB) blocks."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved, context.target_max_block_size = context.target_max_block_size, max_bytes
    try:
        yield
    finally:
        context.target_max_block_size = saved


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def start_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def restart_ray() -> None:
    """A fresh shared instance (see tests/stages/engine/test_engine.py)."""
    from stages.cluster import shutdown_ray

    shutdown_ray()
    start_ray()


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for every integration test of the session."""
    ray = start_ray()
    yield ray
    from stages.cluster import shutdown_ray

    shutdown_ray()  # and any of its processes that outlive it

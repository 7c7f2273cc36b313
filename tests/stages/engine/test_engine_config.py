"""Engine config: validation and the batch-size warm-up schedule (no Ray)."""

import pytest

from glm.config import ConfigError
from stages.engine.config import EngineConfig, OptimConfig
from stages.engine.loop import lr_lambda


def test_batch_size_warmup_grows_the_global_batch_through_accumulation():
    # micro-batch 1 (the 130B config's case): the batch still grows, one micro-batch at a time
    cfg = EngineConfig(num_workers=2, micro_batch_size=1, grad_accum_steps=8, batch_warmup_steps=4, batch_warmup_start=4)
    assert [cfg.global_batch_at(s) for s in range(6)] == [4, 7 // 2 * 2, 10, 13 // 2 * 2, 16, 16]
    assert [cfg.micro_batches_at(s) for s in range(6)] == [2, 3, 5, 6, 8, 8]
    cfg = EngineConfig(num_workers=4, micro_batch_size=2, grad_accum_steps=3, batch_warmup_steps=10, batch_warmup_start=1)
    assert cfg.global_batch_at(0) == 8  # at least one micro-batch per worker
    assert all(cfg.global_batch_at(s) % 8 == 0 for s in range(12)) and cfg.global_batch_at(10) == 24
    assert EngineConfig(micro_batch_size=4, grad_accum_steps=2, num_workers=2).micro_batches_at(0) == 2  # off by default


def test_a_global_batch_keeps_its_size_for_any_worker_count():
    cfg = EngineConfig(num_workers=2, micro_batch_size=2, global_batch_size=8)
    assert [cfg.micro_batches_at(0, world) for world in (1, 2, 4)] == [4, 2, 1]
    assert all(cfg.global_batch_at(5, world) == 8 for world in (1, 2, 4))
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.check_world(3)


def test_lr_warmup_then_cosine_to_the_floor():
    f = lr_lambda(EngineConfig(train_steps=100, optim=OptimConfig(warmup_steps=10, min_lr_ratio=0.1)))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="skip_data_ranges"):
        EngineConfig(skip_data_ranges=[[5, 3]])
    with pytest.raises(ConfigError, match="checkpoint_every"):
        EngineConfig(checkpoint_every=0)

"""Engine config: validation and the batch-size warm-up schedule (no Ray)."""

import pytest

from glm.config import ConfigError
from stages.engine.config import EngineConfig, OptimConfig
from stages.engine.loop import lr_lambda


def test_batch_size_warmup_ramps_to_the_micro_batch():
    cfg = EngineConfig(num_workers=2, micro_batch_size=8, grad_accum_steps=2, batch_warmup_steps=4, batch_warmup_start=2)
    assert [cfg.micro_batch_at(s) for s in range(6)] == [2, 3, 5, 6, 8, 8]
    assert cfg.global_batch_at(0) == 2 * 2 * 2 and cfg.global_batch_at(10) == 8 * 2 * 2
    assert EngineConfig(micro_batch_size=4).micro_batch_at(0) == 4  # off by default


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

"""The slice of the DeepSpeed engine interface that step and iteration functions use
(`module`, calling it, `backward`, `step`, `train` / `eval`), in one process without Ray or
DeepSpeed: for in-process unit tests and notebooks. Same optimizer, LR schedule and gradient
clipping as the engine (no gradient accumulation: every step() is an optimizer step)."""

from __future__ import annotations

import torch

from stages.engine.config import EngineConfig
from stages.engine.loop import build_optimizer, lr_lambda


class LocalEngine:
    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, steps_per_step: int = 1,
                 clips_gradients: bool = False):
        self.module = model
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps_per_step))
        self.grad_clip = 0.0 if clips_gradients else cfg.optim.grad_clip  # TrainSpec.clips_gradients
        self._grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.grad_clip:
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

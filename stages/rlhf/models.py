"""The modules each RLHF mode trains, built the same way on every worker (same seed, same
weights). Frozen members have requires_grad False, so the engine's optimizer skips them, and
stay in eval mode whatever the container's mode.

- reward: ScalarHeadModel (the SFT backbone + a new scalar head)
- ppo:    PPOModel(actor, critic | trainable; reference, reward | frozen)
- dpo:    DPOModel(policy | trainable; reference | frozen)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from glm.model import GLMModel
from glm.value_head import ScalarHeadModel


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_glm(uri: str, overrides: dict) -> GLMModel:
    """An inference checkpoint's model with GLMConfig fields replaced (e.g. dropout off)."""
    from glm.checkpoint import load_inference_checkpoint

    model, _ = load_inference_checkpoint(uri)
    if overrides:
        changed = GLMModel(dataclasses.replace(model.config, **overrides))
        changed.load_state_dict(model.state_dict())
        model = changed
    return model


def build_reward_model(base: str, overrides: dict) -> ScalarHeadModel:
    return ScalarHeadModel(load_glm(base, overrides)).train()


def load_scalar_model(uri: str, overrides: dict) -> ScalarHeadModel:
    """A reward-model checkpoint as a ScalarHeadModel, with config overrides."""
    from glm.value_head import load_reward_checkpoint

    model, _ = load_reward_checkpoint(uri)
    if overrides:
        changed = ScalarHeadModel(GLMModel(dataclasses.replace(model.config, **overrides)))
        changed.load_state_dict(model.state_dict())
        model = changed
    return model


class RuleReward(nn.Module):
    """Score = share of response tokens that are in a target set (no parameters)."""

    def __init__(self, token_ids: list[int], vocab_size: int):
        super().__init__()
        target = torch.zeros(vocab_size, dtype=torch.bool)
        target[torch.tensor(sorted(set(token_ids)), dtype=torch.long)] = True
        self.register_buffer("target", target, persistent=False)

    def score(self, responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(self.target[torch.tensor(r, dtype=torch.long)].float().mean()) if r else 0.0
                             for r in responses])


class PPOModel(nn.Module):
    """Actor and critic (trained together: one backward and optimizer step, the critic's LR
    scaled by critic_lr_scale), frozen reference and reward.
    `forward(role, **row tensors)`: logits for actor / reference, values for critic / reward."""

    def __init__(self, actor: GLMModel, critic: ScalarHeadModel, reference: GLMModel,
                 reward: ScalarHeadModel | RuleReward, critic_lr_scale: float = 1.0):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.reference, self.reward = _freeze(reference), _freeze(reward)
        self.lr_scales = {"critic.": critic_lr_scale}  # read by the engine's build_optimizer

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        self.reward.eval()
        return self

    def forward(self, role: str, input_ids, position_ids, block_position_ids=None, segment_ids=None,
                prefix_mask=None, **_unused) -> torch.Tensor:
        module = {"actor": self.actor, "critic": self.critic, "reference": self.reference, "reward": self.reward}[role]
        out = module(input_ids, position_ids, block_position_ids, segment_ids, prefix_mask)
        return out if isinstance(module, ScalarHeadModel) else out.logits


def build_ppo_model(base: str, reward_model: str, rule_token_ids: list[int], overrides: dict,
                    critic_lr_scale: float = 1.0) -> PPOModel:
    actor, reference = load_glm(base, overrides), load_glm(base, overrides)
    if reward_model:
        critic, reward = load_scalar_model(reward_model, overrides), load_scalar_model(reward_model, overrides)
    else:  # rule-based reward: the critic starts from the SFT backbone and a new head
        critic = ScalarHeadModel(load_glm(base, overrides))
        reward = RuleReward(rule_token_ids, actor.config.vocab_size)
    return PPOModel(actor, critic, reference, reward, critic_lr_scale).train()


class DPOModel(nn.Module):
    """The trained policy and its frozen reference (both from the SFT checkpoint);
    forward gives the policy's logits."""

    def __init__(self, policy: GLMModel, reference: GLMModel):
        super().__init__()
        self.policy, self.reference = policy, _freeze(reference)

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        return self

    def forward(self, input_ids, position_ids, block_position_ids=None, segment_ids=None, prefix_mask=None,
                **_unused) -> torch.Tensor:
        return self.policy(input_ids, position_ids, block_position_ids, segment_ids, prefix_mask).logits


def build_dpo_model(base: str, overrides: dict) -> DPOModel:
    return DPOModel(load_glm(base, overrides), load_glm(base, overrides)).train()

"""The modules each RLHF mode trains, built the same way on every worker (same seed, same
weights). Frozen members have requires_grad False, so the engine's optimizer skips them, and
stay in eval mode whatever the container's mode.

- reward: ScalarHeadModel (the SFT backbone + a new scalar head)
- ppo:    PPOModel(actor, critic | trainable; reference, reward | frozen)
- grpo, rloo: PPOModel without a critic (actor | trainable; reference, reward | frozen)
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
    scaled by critic_lr_scale, each one's gradient clipped on its own: `clip_groups`), frozen
    reference and reward. critic None: the critic-free modes (grpo, rloo); reward None: rule
    rewards only. `forward(role, **row tensors)`: logits for actor / reference, values for
    critic / reward."""

    def __init__(self, actor: GLMModel, critic: ScalarHeadModel | None, reference: GLMModel,
                 reward: ScalarHeadModel | RuleReward | None, critic_lr_scale: float = 1.0):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.reference = _freeze(reference)
        self.reward = _freeze(reward) if reward is not None else None
        # read by the engine's build_optimizer
        self.lr_scales = {"critic.": critic_lr_scale} if critic is not None else {}

    def clip_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameter sets whose gradients are clipped separately (actor, critic)."""
        groups = {"actor": [p for p in self.actor.parameters() if p.requires_grad]}
        if self.critic is not None:
            groups["critic"] = [p for p in self.critic.parameters() if p.requires_grad]
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        if self.reward is not None:
            self.reward.eval()
        return self

    def forward(self, role: str, input_ids, position_ids, block_position_ids=None, segment_ids=None,
                prefix_mask=None, **_unused) -> torch.Tensor:
        module = {"actor": self.actor, "critic": self.critic, "reference": self.reference, "reward": self.reward}[role]
        out = module(input_ids, position_ids, block_position_ids, segment_ids, prefix_mask)
        return out if isinstance(module, ScalarHeadModel) else out.logits


def build_ppo_model(base: str, reward_model: str, rule_token_ids: list[int], overrides: dict,
                    critic_lr_scale: float = 1.0, critic: bool = True) -> PPOModel:
    """The container of mode ppo (critic True) or grpo / rloo (critic False). Reward: the reward
    model, else the token rule when rule_token_ids, else none (rule rewards only)."""
    actor, reference = load_glm(base, overrides), load_glm(base, overrides)
    reward = None
    if reward_model:
        reward = load_scalar_model(reward_model, overrides)
    elif rule_token_ids:
        reward = RuleReward(rule_token_ids, actor.config.vocab_size)
    value = None
    if critic:  # from the reward model; without one, the SFT backbone and a new head
        value = (load_scalar_model(reward_model, overrides) if reward_model
                 else ScalarHeadModel(load_glm(base, overrides)))
    return PPOModel(actor, value, reference, reward, critic_lr_scale).train()


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

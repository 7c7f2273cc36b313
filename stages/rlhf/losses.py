"""The RLHF objectives as pure tensor functions (no model, no engine), tested on hand-computed
values: pairwise reward loss, DPO, GAE, PPO's clipped policy and value losses, entropy, the
adaptive KL controller and running reward moments, GRPO / RLOO group advantages, the k3 KL.

Shapes: B rows, T positions; `mask` (B, T) is 1 at action (response-token) positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalisation); 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


LOGPROB_CHUNK = 1024
"""Positions per chunk of token_logprobs / token_entropy: the fp32 (chunk, V) intermediates
replace one (B, T, V) fp32 log-softmax."""


def _chunks(logits: torch.Tensor, *others: torch.Tensor):
    """(n, V) logits and (n,) companions over all B x T positions, LOGPROB_CHUNK at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    rest = [o.reshape(-1) for o in others]
    for start in range(0, flat.shape[0], LOGPROB_CHUNK):
        yield (flat[start:start + LOGPROB_CHUNK], *(o[start:start + LOGPROB_CHUNK] for o in rest))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probability of each label under (B, T, V) logits / temperature (the distribution
    rollouts sample from); 0 where labels == -100. Computed in chunks of positions."""
    valid = labels != IGNORE_INDEX
    index = labels.clamp(min=0).long()
    out = []
    for chunk, idx in _chunks(logits, index):
        x = chunk.float() / temperature if temperature != 1.0 else chunk.float()
        out.append(x.gather(-1, idx[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1))
    return torch.cat(out).reshape(labels.shape) * valid


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) entropy of the next-token distribution (logits / temperature), in chunks."""
    out = []
    for (chunk,) in _chunks(logits):
        logp = torch.log_softmax(chunk.float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss: mean of -log sigmoid(r_chosen - r_rejected) (InstructGPT)."""
    return -F.logsigmoid(chosen - rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023) on summed response log-probs (B,): returns (loss, chosen
    implicit reward, rejected implicit reward), rewards = beta * (policy - reference)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (loss.mean(), (beta * (policy_chosen - ref_chosen)).detach(),
            (beta * (policy_rejected - ref_rejected)).detach())


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        bootstrap: torch.Tensor | None = None):
    """Generalised advantage estimation over the action positions of each row.

    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, with V and A
    zero after the last action (the episode ends with the response), except that `bootstrap`
    (B,), when given, is V after the last action: the critic's value of a response cut at
    max_new_tokens (0 for one that ended by itself). Returns (advantages, returns = advantages
    + values), both zero outside `mask`.
    """
    B, T = rewards.shape
    m = mask.to(values.dtype)
    after_last = torch.zeros_like(values)
    if bootstrap is not None:
        positions = torch.arange(T, device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1)
        rows = (last >= 0).nonzero().squeeze(-1)
        after_last[rows, last[rows]] = bootstrap.to(values.dtype)[rows]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * (next_value + after_last[:, t]) - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m[:, t]
        # a non-action position passes nothing backwards (keeps rows independent of padding)
        next_value = values[:, t] * m[:, t]
        next_adv = advantages[:, t]
    return advantages, (advantages + values) * m


def group_advantages(scores: torch.Tensor, k: int, mode: str, eps: float = 1e-6) -> torch.Tensor:
    """Sequence advantages (B,) from scores (B,) of consecutive groups of k samples of one prompt.
    grpo: (r - group mean) / (group std + eps) (DeepSeekMath; identical scores give 0);
    rloo: r - mean of the other k - 1 samples (Ahmadian et al. 2024), = k / (k - 1) (r - mean)."""
    groups = scores.float().reshape(-1, k)
    mean = groups.mean(dim=1, keepdim=True)
    if mode == "grpo":
        std = groups.std(dim=1, keepdim=True) if k > 1 else torch.ones_like(mean)
        out = (groups - mean) / (std + eps)
    elif mode == "rloo":
        out = (groups - mean) * k / (k - 1)
    else:
        raise ValueError(f"group_advantages: mode must be 'grpo' or 'rloo', got {mode!r}")
    return out.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020, GRPO's loss term):
    exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for samples of pi."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float):
    """PPO's clipped surrogate: mean over actions of max(-A r, -A clip(r, 1-e, 1+e)),
    r = exp(logp - logp_old). Returns (loss, clip fraction, approximate KL to the old policy)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean over actions of max((V - R)^2, (V_clipped - R)^2),
    V_clipped = V_old + clip(V - V_old, -c, c)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (logp - logp_ref) at every action, plus the sequence
    score (B,) at the last action of each row (InstructGPT / DeepSpeed-Chat)."""
    m = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * m
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def update_moments(moments: dict, values: list[float]) -> dict:
    """Running count / mean / M2 of rewards (Chan et al. batch update), for normalisation."""
    n, mean, m2 = moments.get("count", 0), moments.get("mean", 0.0), moments.get("m2", 0.0)
    if not values:
        return dict(moments)
    b = len(values)
    b_mean = sum(values) / b
    b_m2 = sum((v - b_mean) ** 2 for v in values)
    total = n + b
    delta = b_mean - mean
    return {"count": total, "mean": mean + delta * b / total, "m2": m2 + b_m2 + delta ** 2 * n * b / total}


def moments_std(moments: dict) -> float:
    n = moments.get("count", 0)
    return math.sqrt(moments["m2"] / (n - 1)) if n > 1 else 1.0

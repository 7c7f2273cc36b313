"""The RLHF objectives against values computed by hand on small tensors."""

import math

import pytest
import torch

from stages.rlhf.losses import (
    adaptive_kl_coef, dpo_loss, gae, kl_penalty_rewards, masked_whiten, moments_std, pairwise_loss, policy_loss,
    token_logprobs, update_moments, value_loss,
)


def test_gae_matches_hand_computation_and_ignores_non_action_positions():
    # actions at positions 1..3 of 5 (position 0: prompt, 4: padding); gamma 0.9, lambda 0.8
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[7.0, 0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 1.0 - 0.3                                   # delta at the last action, V after it = 0
    a1 = (0.9 * 0.3 - 0.4) + 0.72 * a2               # delta_1 + gamma * lambda * A_2
    a0 = (0.9 * 0.4 - 0.5) + 0.72 * a1
    assert adv[0].tolist() == pytest.approx([0.0, a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])
    # lambda = 1, gamma = 1: advantages are reward-to-go minus value
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0, 1:4].tolist() == pytest.approx([1 - 0.5, 1 - 0.4, 1 - 0.3])


def test_clipped_policy_loss_matches_hand_computation():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last entry is not an action
    loss, clip_frac, _ = policy_loss(new, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): 1.5 -> clipped -1.2; 0.5 with A<0 -> clipped 0.8; 1.1 -> unclipped -2.2
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert float(clip_frac) == pytest.approx(2 / 3)


def test_clipped_value_loss_matches_hand_computation():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[1.0, -1.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # position 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; position 1: (0.1+1)^2 = 1.21 (inside the clip)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21) / 2)


def test_pairwise_and_dpo_losses():
    assert float(pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]))) == pytest.approx(math.log(1 + math.exp(-1)))
    loss, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                            beta=0.1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.1)))  # logits 0.1 * (0.5 + 0.5)
    assert float(rc) == pytest.approx(0.05) and float(rr) == pytest.approx(-0.05)
    smooth, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                            beta=0.1, label_smoothing=0.25)
    assert float(smooth) == pytest.approx(0.75 * math.log(1 + math.exp(-0.1)) + 0.25 * math.log(1 + math.exp(0.1)))


def test_kl_penalty_puts_the_score_on_the_last_action():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    rewards = kl_penalty_rewards(logp, ref, torch.tensor([3.0]), torch.tensor([[0, 1, 1, 0]]), kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1 + 3.0, 0.0])


def test_token_logprobs_whiten_kl_controller_and_moments():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    lp = token_logprobs(logits, torch.tensor([[1, -100]]))
    assert lp[0].tolist() == pytest.approx([math.log(0.75), 0.0])
    w = masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    assert w[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)
    assert adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=5.7, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.005))
    values = [0.5, 2.0, -1.0, 4.0, 3.5]
    m = update_moments(update_moments({}, values[:2]), values[2:])
    assert m["mean"] == pytest.approx(sum(values) / 5)
    assert moments_std(m) == pytest.approx(torch.tensor(values).std().item())


def test_token_logprobs_and_entropy_are_at_the_sampling_temperature_in_chunks(monkeypatch):
    from stages.rlhf import losses
    from stages.rlhf.losses import token_entropy

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = expected * (labels != -100)
    monkeypatch.setattr(losses, "LOGPROB_CHUNK", 3)  # chunks cross row boundaries
    assert torch.allclose(token_logprobs(logits, labels, temperature=0.7), expected, atol=1e-6)
    logp = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(token_entropy(logits, temperature=0.7), -(logp.exp() * logp).sum(-1), atol=1e-6)


def test_gae_bootstraps_a_cut_response_from_the_value_after_its_last_action():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    plain, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    boot, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0, bootstrap=torch.tensor([0.0, 2.0]))
    assert torch.equal(boot[0], plain[0])  # an ended response: V after it is 0
    assert boot[1, :3].tolist() == pytest.approx([3 - 0.5, 3 - 0.4, 3 - 0.3])  # reward + bootstrap - V
    assert boot[1, 3] == 0 and ret[1, 3] == 0


def test_group_advantages_grpo_rloo_and_the_k3_kl():
    from stages.rlhf.losses import group_advantages, k3_kl

    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3
    grpo = group_advantages(scores, 3, "grpo")
    assert grpo[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)  # (r - 2) / std 1
    assert grpo[3:].tolist() == [0.0, 0.0, 0.0]  # identical scores: no signal, no division by 0
    rloo = group_advantages(scores, 3, "rloo")
    assert rloo[:3].tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5])  # r - mean of the other two
    assert rloo[3:].tolist() == [0.0, 0.0, 0.0]
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.0, math.exp(1) - 1 - 1])

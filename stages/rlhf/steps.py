"""Step functions of the pairwise modes (one micro-batch of pair rows -> loss and metrics):
the reward model and DPO. Pair rows hold the chosen side in segment 1 and the rejected side
in segment 2 (`stages/rlhf/data.py`)."""

from __future__ import annotations

import torch

from glm.value_head import last_token_index
from stages.rlhf.losses import dpo_loss, pairwise_loss, token_logprobs

INPUTS = ("input_ids", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")


def side_rewards(model, batch: dict, segments: tuple[int, ...] = (1, 2)) -> list[torch.Tensor]:
    """(B,) rewards of each segment's side: the values read at its last token (the reply's last
    one). Pair rows: segment 1 the chosen side, 2 the rejected one."""
    values = model(**{k: batch[k] for k in INPUTS})  # (B, T)
    rows = torch.arange(values.shape[0], device=values.device)
    return [values[rows, last_token_index(batch["segment_ids"], s)] for s in segments]


def reward_step(engine, batch: dict) -> dict:
    """Pairwise loss on the rewards read at each side's last token; accuracy, margin, moments."""
    chosen, rejected = side_rewards(engine, batch)
    both = torch.cat([chosen, rejected]).detach()
    return {"loss": pairwise_loss(chosen, rejected), "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean().detach(), "reward_mean": both.mean(), "reward_std": both.std()}


def segment_logprobs(logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor, segment: int) -> torch.Tensor:
    """(B,) summed log-probs of one segment's targets."""
    return (token_logprobs(logits, labels) * (segment_ids == segment)).sum(-1)


def dpo_step(engine, batch: dict, beta: float, label_smoothing: float = 0.0) -> dict:
    """DPO against the frozen reference inside the model container."""
    inputs = {k: batch[k] for k in INPUTS}
    labels, seg = batch["labels"], batch["segment_ids"]
    logits = engine(**inputs)
    with torch.no_grad():
        ref_logits = engine.module.reference(**inputs).logits
    pc, pr = segment_logprobs(logits, labels, seg, 1), segment_logprobs(logits, labels, seg, 2)
    rc, rr = segment_logprobs(ref_logits, labels, seg, 1), segment_logprobs(ref_logits, labels, seg, 2)
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    return {"loss": loss, "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
            "reward_margin": (chosen_reward - rejected_reward).mean(),
            "chosen_logratio": (pc - rc).mean().detach(), "rejected_logratio": (pr - rr).mean().detach()}

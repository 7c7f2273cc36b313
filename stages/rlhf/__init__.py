"""RLHF stage: reward model (pairwise), PPO (actor, critic, frozen reference and reward) and
DPO, all on the training engine (`python -m stages.rlhf --config FILE`)."""

"""Pretraining stage: GLM on the data stage's shards with the training engine (`python -m stages.pretrain`)."""

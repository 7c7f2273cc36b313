"""A GLM backbone with a scalar head: the reward model and the PPO critic.

The head reads the final LayerNorm's output (the hidden state the LM head projects) at every
position, so one forward gives a value per token; a reward is the value at the response's
last token. The backbone's own forward is reused unchanged (a hook on the final LayerNorm
captures the hidden states), so P-Tuning v2 prefixes, 2D RoPE and activation checkpointing
behave exactly as in the language model.

Reward-model checkpoint: an inference checkpoint of the backbone (`glm.checkpoint`: weights,
config, tokenizer; metadata `kind: reward_model`) plus `value_head.safetensors` holding
`weight` (1, hidden) and `bias` (1,).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from glm.model import GLMModel

HEAD_FILE = "value_head.safetensors"


class ScalarHeadModel(nn.Module):
    """GLM backbone + Linear(hidden, 1) on the final hidden states."""

    def __init__(self, backbone: GLMModel):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (backbone.config.hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids, position_ids, block_position_ids=None, segment_ids=None, prefix_mask=None,
                **_unused) -> torch.Tensor:
        """Values (B, T) in fp32, one per input position."""
        captured = []
        hook = self.backbone.final_layernorm.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self.backbone(input_ids, position_ids, block_position_ids, segment_ids, prefix_mask)
        finally:
            hook.remove()
        return self.value_head(captured[0]).squeeze(-1).float()  # (B, T)


def last_token_index(segment_ids: torch.Tensor, segment: int) -> torch.Tensor:
    """(B,) index of the last token of `segment` in each row (rows must contain it)."""
    hit = segment_ids == segment
    if not bool(hit.any(dim=1).all()):
        raise ValueError(f"a row has no token of segment {segment}")
    positions = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    return torch.where(hit, positions, -1).amax(dim=1)


def save_reward_checkpoint(model: ScalarHeadModel, tokenizer, uri: str | Path,
                           metadata: dict[str, Any] | None = None) -> str:
    """Write the backbone as an inference checkpoint plus value_head.safetensors (local or URI)."""
    from safetensors.torch import save as save_bytes

    from glm.checkpoint import _is_remote, _local_path, save_inference_checkpoint

    uri = str(uri)
    save_inference_checkpoint(model.backbone, tokenizer, uri, metadata={**(metadata or {}), "kind": "reward_model"})
    head = save_bytes({k: v.detach().cpu().contiguous().float() for k, v in model.value_head.state_dict().items()})
    if _is_remote(uri):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_output_stream(f"{path}/{HEAD_FILE}") as f:
            f.write(head)
    else:
        (_local_path(uri) / HEAD_FILE).write_bytes(head)
    return uri


def load_reward_checkpoint(uri: str | Path, device: str | torch.device = "cpu") -> tuple[ScalarHeadModel, Any]:
    """(ScalarHeadModel in eval mode, tokenizer) from a reward-model checkpoint."""
    from safetensors.torch import load as load_bytes

    from glm.checkpoint import _is_remote, _local_path, load_inference_checkpoint

    uri = str(uri)
    backbone, tokenizer = load_inference_checkpoint(uri, device=device)
    if _is_remote(uri):
        import pyarrow.fs as pafs

        from glm.checkpoint import REQUIRED_FILES
        from glm.checkpoint_dir import current

        fs, path = pafs.FileSystem.from_uri(current(uri, REQUIRED_FILES))
        with fs.open_input_stream(f"{path}/{HEAD_FILE}") as f:
            data = f.read()
    else:
        head_path = _local_path(uri) / HEAD_FILE
        if not head_path.exists():
            raise FileNotFoundError(f"{uri}: no {HEAD_FILE}: an inference checkpoint, not a reward model")
        data = head_path.read_bytes()
    model = ScalarHeadModel(backbone)
    model.value_head.load_state_dict(load_bytes(data))
    return model.to(device).eval(), tokenizer

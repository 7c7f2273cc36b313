"""P-Tuning v2 prefixes in the model, LoRA, and the export helpers (merge, fold)."""

import pytest
import torch

from glm.adapters import LoRALinear, apply_lora, fold_prefix_projection, freeze_all_but, merge_lora, trainable_share
from glm.config import preset
from glm.model import GLMModel


def batch(B=2, T=12, vocab=500):
    ids = torch.randint(0, vocab, (B, T))
    pos = torch.arange(T).expand(B, T)
    prefix = torch.zeros(B, T, dtype=torch.long)
    prefix[:, :5] = 1
    return ids, pos, prefix


def test_prefixes_are_attended_to_but_not_cached():
    model = GLMModel(preset("tiny", pre_seq_len=4, prefix_projection=True)).double().eval()
    ids, pos, prefix = batch()
    full = model(ids, pos, prefix_mask=prefix).logits
    head = model(ids[:, :8], pos[:, :8], prefix_mask=prefix[:, :8], use_cache=True)
    assert head.past_key_values[0][0].shape[2] == 8  # the cache holds tokens only
    seg = torch.ones(2, 12, dtype=torch.long)
    tail = model(ids[:, 8:], pos[:, 8:], segment_ids=seg, prefix_mask=prefix, past_key_values=head.past_key_values)
    torch.testing.assert_close(tail.logits, full[:, 8:])
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.mul_(50)
    assert not torch.allclose(model(ids, pos, prefix_mask=prefix).logits, full)


def test_folding_the_prefix_mlp_keeps_the_logits():
    model = GLMModel(preset("tiny", pre_seq_len=3, prefix_projection=True, prefix_hidden_size=32)).double().eval()
    ids, pos, prefix = batch()
    before = model(ids, pos, prefix_mask=prefix).logits
    fold_prefix_projection(model)
    assert model.config.prefix_projection is False and model.prefix_encoder.trans is None
    assert model.prefix_encoder.embedding.weight.shape == (3, 2 * 2 * 64)
    torch.testing.assert_close(model(ids, pos, prefix_mask=prefix).logits, before)
    reloaded = GLMModel(model.config).double().eval()
    reloaded.load_state_dict(model.state_dict())  # the folded config describes the folded weights
    torch.testing.assert_close(reloaded(ids, pos, prefix_mask=prefix).logits, before)


def test_lora_starts_as_the_base_and_merges_to_the_same_logits():
    model = GLMModel(preset("tiny")).double().eval()
    ids, pos, prefix = batch()
    base = model(ids, pos, prefix_mask=prefix).logits
    apply_lora(model, rank=4, alpha=8.0)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 2
    torch.testing.assert_close(model(ids, pos, prefix_mask=prefix).logits, base)  # B = 0 at the start
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.05)
    adapted = model(ids, pos, prefix_mask=prefix).logits
    assert not torch.allclose(adapted, base)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(GLMModel(preset("tiny")).state_dict())  # plain checkpoint keys
    torch.testing.assert_close(model(ids, pos, prefix_mask=prefix).logits, adapted)


def test_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="unknown LoRA target.*'wq'"):
        apply_lora(GLMModel(preset("tiny")), rank=2, alpha=2.0, targets=("wq",))


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_parameter_efficient_methods_train_under_one_percent_at_6b(method):
    if method == "ptuning":
        config = preset("chatglm_6b", pre_seq_len=128)
    else:
        config = preset("chatglm_6b")
    with torch.device("meta"):
        model = GLMModel(config)
        if method == "lora":
            apply_lora(model, rank=8, alpha=16.0)
    freeze_all_but(model, ("prefix_encoder.",) if method == "ptuning" else ("lora_a", "lora_b"))
    trainable, total = trainable_share(model)
    assert 0 < trainable / total < 0.01

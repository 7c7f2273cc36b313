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


@pytest.mark.parametrize("tied", [True, False])
def test_trained_rows_learn_only_their_rows_and_merge_to_the_same_logits(tied):
    from glm.adapters import train_rows

    torch.manual_seed(0)
    model = GLMModel(preset("tiny", tie_word_embeddings=tied)).double()
    ids, pos, prefix = batch()
    ids[:, 3] = 7  # a "role token" in every row
    before = model(ids, pos, prefix_mask=prefix).logits.detach()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    train_rows(model, [7, 9])
    freeze_all_but(model, (".rows",))
    torch.testing.assert_close(model(ids, pos, prefix_mask=prefix).logits, before)  # starts as the base
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"word_embeddings.rows"} | (set() if tied else {"lm_head.rows"})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(ids, pos, prefix_mask=prefix).logits[..., 7].sum().backward()
    optimizer.step()
    trained = model(ids, pos, prefix_mask=prefix).logits.detach()
    assert not torch.allclose(trained, before)
    merged = merge_lora(model)
    torch.testing.assert_close(merged(ids, pos, prefix_mask=prefix).logits, trained)
    state = merged.state_dict()
    assert state.keys() == original.keys()
    changed = {k for k in state if not torch.equal(state[k], original[k])}
    assert changed == {"word_embeddings.weight"} | (set() if tied else {"lm_head.weight"})
    rows = (state["word_embeddings.weight"] != original["word_embeddings.weight"]).any(-1).nonzero().flatten()
    assert set(rows.tolist()) <= {7, 9} and 7 in rows.tolist()

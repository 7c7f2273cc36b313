"""The GLM transformer: the attention rule end to end, EGS, KV cache, checkpointing."""

import pytest
import torch

from glm.config import preset
from glm.model import GLMModel
from glm.schema import part_b_positions


def tiny_model(**overrides) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(preset("tiny", **overrides)).double().eval()


def packed_row():
    """Segment 1: 5 prefix + 4 Part-B tokens; segment 2: 3 prefix + 3 Part-B; 2 padding."""
    seg = torch.tensor([[1] * 9 + [2] * 6 + [0] * 2])
    pre = torch.tensor([[1] * 5 + [0] * 4 + [1] * 3 + [0] * 3 + [0] * 2])
    pos = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 4, 4, 0, 1, 2, 2, 2, 2, 0, 0]])
    block = torch.tensor([[0] * 5 + [1, 2, 3, 4] + [0] * 3 + [1, 2, 3] + [0, 0]])
    ids = torch.randint(10, 500, seg.shape)
    return ids, pos, block, seg, pre


def logits_of(model, ids, pos, block, seg, pre):
    with torch.no_grad():
        return model(ids, pos, block, seg, pre).logits[0]


def test_part_b_change_leaves_part_a_unchanged_and_part_b_is_causal():
    model = tiny_model()
    ids, pos, block, seg, pre = packed_row()
    base = logits_of(model, ids, pos, block, seg, pre)
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 500  # a Part-B token of segment 1
    out = logits_of(model, changed, pos, block, seg, pre)
    assert torch.equal(out[:6], base[:6])  # all of Part A and the earlier Part-B token
    assert not torch.allclose(out[6:9], base[6:9])  # later Part-B tokens see it
    assert torch.equal(out[9:15], base[9:15])  # the other packed segment never does


def test_part_a_is_bidirectional_and_segments_are_isolated():
    model = tiny_model()
    ids, pos, block, seg, pre = packed_row()
    base = logits_of(model, ids, pos, block, seg, pre)
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 500  # last Part-A token of segment 1
    out = logits_of(model, changed, pos, block, seg, pre)
    assert not torch.allclose(out[0], base[0])  # an earlier Part-A token sees a later one
    assert torch.equal(out[9:15], base[9:15])
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 500  # segment 2
    assert torch.equal(logits_of(model, changed, pos, block, seg, pre)[:9], base[:9])


def test_row_without_prefix_is_a_causal_lm():
    model = tiny_model(position_encoding="rope_1d")
    T = 12
    ids = torch.randint(10, 500, (1, T))
    pos = torch.arange(T)[None]
    with torch.no_grad():
        full = model(ids, pos).logits[0]
        for t in (1, 5, 11):
            part = model(ids[:, :t], pos[:, :t]).logits[0]
            assert torch.allclose(part, full[:t], atol=1e-10)


def test_embedding_gradient_shrink():
    x = torch.randint(10, 500, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    grads, logits = {}, {}
    for alpha in (0.1, 1.0):
        model = tiny_model(embedding_grad_shrink=alpha).train()
        out = model(x, pos, labels=x)
        out.loss.backward()
        grads[alpha] = model.word_embeddings.weight.grad
        logits[alpha] = out.logits.detach()
    assert torch.allclose(logits[0.1], logits[1.0], rtol=0, atol=1e-12)  # forward unchanged
    assert torch.allclose(grads[0.1], 0.1 * grads[1.0], rtol=1e-10, atol=0)
    assert grads[1.0].abs().sum() > 0


@pytest.mark.parametrize("encoding, residual", [("rope_1d", "deepnorm"), ("rope_2d", "deepnorm"), ("rope_2d", "pre_ln")])
def test_kv_cache_decoding_equals_full_recompute(encoding, residual):
    model = tiny_model(position_encoding=encoding, residual=residual)
    use_2d = encoding == "rope_2d"
    n_a, n_b = 7, 6
    pos_b, block_b = part_b_positions(n_a - 1, n_a, n_b, is_gmask=True, use_2d=use_2d)
    ids = torch.randint(10, 500, (1, n_a + n_b))
    pos = torch.tensor([list(range(n_a)) + pos_b])
    block = torch.tensor([[0] * n_a + block_b])
    seg = torch.ones_like(ids)
    pre = torch.tensor([[1] * n_a + [0] * n_b])
    with torch.no_grad():
        full = model(ids, pos, block, seg, pre).logits[0]
        k = n_a + 1
        out = model(ids[:, :k], pos[:, :k], block[:, :k], seg[:, :k], pre[:, :k], use_cache=True)
        steps = [out.logits[0, -1]]
        for t in range(k, n_a + n_b):
            out = model(ids[:, t:t + 1], pos[:, t:t + 1], block[:, t:t + 1], seg[:, :t + 1], pre[:, :t + 1],
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1])
    assert torch.allclose(torch.stack(steps), full[k - 1:], atol=1e-10)


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(10, 500, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(activation_checkpointing=ckpt).train()
        model(x, pos, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_dropout_is_active_only_in_training():
    model = tiny_model(hidden_dropout=0.5, attention_dropout=0.5)
    x = torch.randint(10, 500, (1, 8))
    pos = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(model(x, pos).logits, model(x, pos).logits)
        model.train()
        assert not torch.equal(model(x, pos).logits, model(x, pos).logits)


def test_deepnorm_init_gains():
    model = GLMModel(preset("small", num_layers=24, hidden_size=256))
    block = model.layers[0]
    h = model.config.hidden_size
    qkv = block.attention.query_key_value.weight
    xavier = (2.0 / (h + h)) ** 0.5
    beta = (2 * 24) ** -0.5
    assert abs(qkv[:h].std().item() - xavier) / xavier < 0.05  # query: gain 1
    assert abs(qkv[2 * h:].std().item() - beta * xavier) / (beta * xavier) < 0.05  # value: gain beta
    assert block.attention.query_key_value.bias.abs().sum() == 0


def test_half_precision_forward_is_finite():
    model = GLMModel(preset("tiny")).to(torch.bfloat16).eval()
    x = torch.randint(10, 500, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(x, torch.arange(16).expand(2, 16)).logits.float()).all()

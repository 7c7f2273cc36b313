"""Weight-only INT8 / INT4 quantization: packing, error bounds, quantized models and checkpoints."""

import json

import pytest
import torch
import torch.nn as nn

from glm.checkpoint import (load_inference_checkpoint, read_checkpoint_config, read_checkpoint_quantization,
                            save_inference_checkpoint)
from glm.config import padded_vocab_size, preset
from glm.generation import GenerationConfig, fill_blanks
from glm.model import GLMModel
from glm.quantization import (QuantizedLinear, QuantSpec, block_linear_names, fp16_linear_weight_bytes,
                              linear_weight_bytes, quantize_checkpoint, quantize_model, quantize_weight)
from kernels.quant_matmul import dequantize, pack_int4, unpack_int4

SPECS = [QuantSpec(8), QuantSpec(4), QuantSpec(4, group_size=16), QuantSpec(8, group_size=32)]


def tiny_model(tokenizer, **overrides) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), **overrides)).eval()


@pytest.mark.parametrize("cols", [2, 7])
def test_pack_then_unpack_is_identity_on_all_int4_values(cols):
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values)  # every (even, odd) column pair: (256, 2)
    q = pairs.repeat(1, 4)[:, :cols].contiguous()  # odd widths too: a zero nibble pads the last byte
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (256, (cols + 1) // 2)
    assert torch.equal(unpack_int4(packed, cols), q)
    # even column in the high nibble (GLM_SPEC.md section 4)
    assert pack_int4(torch.tensor([[-1, 3]], dtype=torch.int8)).view(torch.uint8).item() == 0xF3


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_dequantize_error_is_at_most_half_a_step(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[3, 5] = 40.0  # an outlier
    w[7] = 0.0  # an all-zero row
    qweight, scales = quantize_weight(w, spec)
    groups = 1 if not spec.group_size else -(-80 // spec.group_size)
    assert scales.dtype == torch.float16 and scales.shape == (48, groups)
    q = unpack_int4(qweight, 80) if spec.bits == 4 else qweight
    assert q.abs().max() <= 2 ** (spec.bits - 1) - 1
    deq = dequantize(qweight, scales, bits=spec.bits, group_size=spec.group_size, in_features=80,
                     dtype=torch.float32)
    step = scales.float().repeat_interleave(spec.group_size or 80, dim=1)[:, :80]
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    assert torch.equal(deq[7], torch.zeros(80))


def test_int8_tiny_model_gives_near_identical_logits(tokenizer):
    model = tiny_model(tokenizer)
    x = torch.tensor([tokenizer.encode("话说天下大势 The quick brown fox jumps over the lazy dog")])
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        fp = model(x, pos).logits
        quantize_model(model, QuantSpec(8))
        q8 = model(x, pos).logits
    assert isinstance(model.layers[0].attention.query_key_value, QuantizedLinear)
    rel = (q8 - fp).abs().max() / fp.abs().max()
    assert rel < 1e-2, f"INT8 logits differ by {rel:.2e} of the logit range"
    assert torch.equal(q8.argmax(-1), fp.argmax(-1))


def test_only_block_linears_are_quantized(tokenizer):
    model = tiny_model(tokenizer)
    model.prefix_encoder = nn.Linear(8, 8)  # like SFT's P-Tuning v2 encoder: must stay untouched
    quantize_model(model, QuantSpec(4, group_size=32))
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(block_linear_names(model)) and len(quantized) == 4 * model.config.num_layers
    assert type(model.prefix_encoder) is nn.Linear and type(model.lm_head) is nn.Linear
    assert model.word_embeddings.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="already quantized"):
        quantize_model(model, QuantSpec(4))


def test_int4_weight_bytes_are_about_a_quarter(tokenizer):
    model = quantize_model(tiny_model(tokenizer), QuantSpec(4))
    ratio = linear_weight_bytes(model) / fp16_linear_weight_bytes(model)
    assert 0.25 < ratio <= 0.30  # 4 bits per weight plus one fp16 scale per row


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, group_size=32)], ids=lambda s: s.name)
def test_quantized_checkpoint_loads_and_generates_like_the_in_memory_model(tokenizer, tmp_path, spec):
    fp_model = tiny_model(tokenizer, tie_word_embeddings=spec.bits == 8)
    save_inference_checkpoint(fp_model, tokenizer, tmp_path / "fp", metadata={"stage": "test"})
    report = quantize_checkpoint(tmp_path / "fp", tmp_path / "q", spec, metadata={"stage": "quantize"},
                                 progress=lambda msg: None)
    assert report["quantized_tensors"] == 4 * fp_model.config.num_layers
    in_memory = quantize_model(fp_model, spec)
    assert report["linear_bytes_quantized"] == linear_weight_bytes(in_memory)

    loaded, tok = load_inference_checkpoint(tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert read_checkpoint_quantization(tmp_path / "q") == spec
    assert read_checkpoint_quantization(tmp_path / "fp") is None
    config, meta = read_checkpoint_config(tmp_path / "q")
    assert config == fp_model.config and meta == {"stage": "quantize"}
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == spec.to_dict()
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(in_memory.state_dict().items())):
        assert torch.equal(a, b), name  # streaming conversion == in-memory conversion, bit for bit

    gen = GenerationConfig(max_new_tokens=12)
    texts = ["First Citizen: Before we proceed any further, [MASK] speak.", "话说天下大势"]
    assert [r.token_ids for r in fill_blanks(loaded, tok, texts, gen)] == \
        [r.token_ids for r in fill_blanks(in_memory, tokenizer, texts, gen)]

    # an in-memory quantized model saves to the same format
    save_inference_checkpoint(in_memory, tokenizer, tmp_path / "q2")
    assert read_checkpoint_quantization(tmp_path / "q2") == spec
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", spec, progress=lambda msg: None)


def test_loading_in_bfloat16_keeps_fp16_scales(tokenizer, tmp_path):
    save_inference_checkpoint(quantize_model(tiny_model(tokenizer), QuantSpec(4)), tokenizer, tmp_path / "q")
    model, _ = load_inference_checkpoint(tmp_path / "q", dtype=torch.bfloat16)
    layer = model.layers[0].mlp.dense_h_to_4h
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16 and model.word_embeddings.weight.dtype == torch.bfloat16
    x = torch.tensor([tokenizer.encode("abc")])
    assert torch.isfinite(model(x, torch.arange(x.shape[1])[None]).logits).all()


def test_bad_quantization_entries_are_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantSpec(3)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, group_size=7)
    save_inference_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    data["quantization"] = {"bits": 2}
    (tmp_path / "c" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config.json: quantization: invalid quantization entry"):
        read_checkpoint_quantization(tmp_path / "c")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, group_size=32), QuantSpec(8)], ids=lambda s: s.name)
def test_quantized_model_on_cuda_matches_cpu(tokenizer, tmp_path, spec):
    """The same quantized checkpoint on CUDA (fp16, the Triton kernel) and on CPU (fp32, reference)."""
    save_inference_checkpoint(quantize_model(tiny_model(tokenizer), spec), tokenizer, tmp_path / "q")
    cpu, _ = load_inference_checkpoint(tmp_path / "q")
    gpu, _ = load_inference_checkpoint(tmp_path / "q", device="cuda", dtype=torch.float16)
    x = torch.tensor([tokenizer.encode("话说天下大势 The quick brown fox jumps over the lazy dog")])
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        expected = cpu(x, pos).logits
        got = gpu(x.cuda(), pos.cuda()).logits.float().cpu()
    assert (got - expected).abs().max() / expected.abs().max() < 1e-2

"""ChatGLM-6B's published layout in and out (glm.chatglm_hf), proved on a tiny model written in
that layout: the imported model's logits equal a forward pass written from the published
modeling_chatglm.py (tests/chatglm_reference.py), export -> import gives identical tensors, and a
bad directory is refused with the file, key and shape named."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatglm_reference import (chatglm_preprocess, published_inputs, published_logits, random_state,
                               tiny_config, train_ice_text, write_chatglm_dir)
from conftest import sample_texts
from glm.chatglm_hf import (export_chatglm, import_chatglm, main, qkv_from_chatglm, qkv_to_chatglm,
                            read_chatglm_weights)
from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config, save_inference_checkpoint
from glm.config import padded_vocab_size, preset
from glm.model import GLMModel

quiet = dict(progress=lambda _: None)


@pytest.fixture(scope="module")
def ice_text():
    return train_ice_text(sample_texts())


def chatglm_dir(path, ice_text, *, image_tokens=0, fmt="safetensors", shards=2, two_d=True, pre_seq_len=None, seed=0):
    cfg = tiny_config(ice_text, image_tokens, two_d=two_d, pre_seq_len=pre_seq_len)
    state = random_state(cfg, seed)
    write_chatglm_dir(path, cfg, state, ice_text, image_tokens, fmt=fmt, shards=shards)
    return cfg, state


def batch(tokenizer):
    """Two sequences of one length: a [gMASK] chat turn and a [MASK] blank, each with <sop>."""
    s = tokenizer.special
    a = tokenizer.encode("话说天下大势，分久必合") + [s.gmask, s.sop] + tokenizer.encode("合久必分。周末七国分争")
    b = tokenizer.encode("The quick brown") + [s.mask] + tokenizer.encode("over dogs") + [s.sop] + tokenizer.encode("fox jumps")
    n = min(len(a), len(b))
    return torch.tensor([a[:n], b[:n]])


def our_logits(model, ids, position_ids, cfg):
    context = torch.tensor([seq.index(cfg["bos_token_id"]) for seq in ids.tolist()])
    prefix_mask = (torch.arange(ids.shape[1])[None] < context[:, None]).long()
    if cfg["position_encoding_2d"]:
        position_ids, block_position_ids = position_ids[:, 0], position_ids[:, 1]
    else:
        block_position_ids = None
    with torch.no_grad():
        return model(ids, position_ids, block_position_ids, prefix_mask=prefix_mask).logits


VARIANTS = {  # (weights format, shards, num_image_tokens, 2D positions, P-Tuning v2 prefix length)
    "safetensors-shards": ("safetensors", 2, 0, True, None),
    "bin-shards-image-offset": ("bin", 3, 100, True, None),
    "safetensors-single-1d": ("safetensors", 1, 0, False, None),
    "bin-single-ptuning-prefix": ("bin", 1, 0, True, 4),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_logits_equal_the_published_forward(tmp_path, ice_text, variant):
    fmt, shards, image_tokens, two_d, pre_seq_len = VARIANTS[variant]
    cfg, state = chatglm_dir(tmp_path / "hf", ice_text, image_tokens=image_tokens, fmt=fmt, shards=shards,
                             two_d=two_d, pre_seq_len=pre_seq_len)
    import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)
    model, tokenizer = load_inference_checkpoint(tmp_path / "ckpt")
    assert model.config.rope_fp16_frequencies and model.config.pre_seq_len == (pre_seq_len or 0)
    assert tokenizer.convention == "chatglm" and tokenizer.special.gmask == cfg["gmask_token_id"]
    ids = batch(tokenizer)
    assert int(ids.min()) >= image_tokens  # text ids sit after the image tokens
    position_ids, attention_mask = published_inputs(ids, cfg)
    with torch.no_grad():
        expected = published_logits(state, cfg, ids, position_ids, attention_mask)
    ours = our_logits(model, ids, position_ids, cfg)
    assert ours.shape == expected.shape == (2, ids.shape[1], cfg["vocab_size"])
    assert (ours - expected).abs().max().item() <= 1e-5
    assert expected.std().item() > 0.5  # not a trivially small output

    # the model option matters: exact fp32 RoPE frequencies give other logits on the same weights
    exact = GLMModel(model.config.__class__(**{**model.config.to_dict(), "rope_fp16_frequencies": False})).eval()
    exact.load_state_dict(model.state_dict())
    assert (our_logits(exact, ids, position_ids, cfg) - expected).abs().max().item() > 1e-4


def test_qkv_permutation_is_per_head_and_inverts():
    heads, h = 3, 6  # head_dim 2
    rows = torch.arange(3 * h)  # published order: head 0 q(2) k(2) v(2), head 1 ...
    ours = qkv_from_chatglm(rows, heads)
    # ours: all q rows (head 0, 1, 2), then all k, then all v
    assert ours.tolist() == [0, 1, 6, 7, 12, 13, 2, 3, 8, 9, 14, 15, 4, 5, 10, 11, 16, 17]
    weight = torch.randn(3 * h, 5)
    assert torch.equal(qkv_to_chatglm(qkv_from_chatglm(weight, heads), heads), weight)


@pytest.mark.parametrize("image_tokens,fmt", [(0, "safetensors"), (100, "bin")])
def test_export_then_import_round_trips_exactly(tmp_path, ice_text, image_tokens, fmt):
    cfg, state = chatglm_dir(tmp_path / "hf", ice_text, image_tokens=image_tokens, fmt=fmt, pre_seq_len=4)
    import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)
    export_chatglm(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_bytes=64 << 10, **quiet)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    exported = {name: t for name, t, _ in read_chatglm_weights(out, lambda _: None)}
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor.float()), name
    written = json.loads((out / "config.json").read_text())
    assert {k: written[k] for k in cfg} == cfg
    assert (out / "ice_text.model").read_bytes() == ice_text
    assert json.loads((out / "tokenizer_config.json").read_text())["num_image_tokens"] == image_tokens
    import_chatglm(str(out), str(tmp_path / "again"), **quiet)
    first, again = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert read_checkpoint_config(tmp_path / "again")[0] == read_checkpoint_config(tmp_path / "ckpt")[0]
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tmp_path / "ckpt" / "tokenizer.model").read_bytes()


def test_a_project_model_exports_to_the_published_forward(tmp_path, tokenizer):
    """A model trained here (its own tokenizer, tied output layer) computes the same logits under
    the published code once exported; without ChatGLM's fp16 RoPE frequencies it is refused."""
    vocab = padded_vocab_size(len(tokenizer))
    model = GLMModel(preset("tiny", vocab_size=vocab, tie_word_embeddings=True, rope_fp16_frequencies=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases, non-unit norms
    save_inference_checkpoint(model, tokenizer, tmp_path / "ckpt")
    export_chatglm(str(tmp_path / "ckpt"), str(tmp_path / "out"), **quiet)
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    state = {name: t for name, t, _ in read_chatglm_weights(out, lambda _: None)}
    assert torch.equal(state["lm_head.weight"], state["transformer.word_embeddings.weight"])
    assert (out / "tokenizer.model").is_file() and not (out / "ice_text.model").exists()
    s = tokenizer.special
    ids = torch.tensor([tokenizer.encode("话说天下大势") + [s.gmask, s.sop] + tokenizer.encode("分久必合")])
    position_ids, attention_mask = published_inputs(ids, cfg)
    with torch.no_grad():
        expected = published_logits(state, cfg, ids, position_ids, attention_mask)
    assert (our_logits(model, ids, position_ids, cfg) - expected).abs().max().item() <= 1e-5

    exact = GLMModel(preset("tiny", vocab_size=vocab))
    save_inference_checkpoint(exact, tokenizer, tmp_path / "exact")
    with pytest.raises(ValueError, match="rope_fp16_frequencies is false"):
        export_chatglm(str(tmp_path / "exact"), str(tmp_path / "refused"), **quiet)
    assert not (tmp_path / "refused").exists()
    export_chatglm(str(tmp_path / "exact"), str(tmp_path / "allowed"), allow_rope_difference=True, **quiet)
    geglu = GLMModel(preset("tiny", vocab_size=vocab, ffn_type="geglu", rope_fp16_frequencies=True))
    save_inference_checkpoint(geglu, tokenizer, tmp_path / "geglu")
    with pytest.raises(ValueError, match="ffn_type 'geglu'"):
        export_chatglm(str(tmp_path / "geglu"), str(tmp_path / "refused"), **quiet)
    with pytest.raises(FileExistsError, match="exists"):
        export_chatglm(str(tmp_path / "ckpt"), str(tmp_path / "out"), **quiet)


def _rewrite_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def _save(path, file, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path / file), metadata={"format": "pt"})


class Evil:
    """Anything but a tensor: full unpickling would construct it."""


BROKEN = {
    "shape": (lambda p, s: _save(p, "model.safetensors", {**s, "transformer.final_layernorm.bias": torch.zeros(65)}),
              ValueError, r"model.safetensors: tensor 'transformer.final_layernorm.bias' has shape \(65,\), expected \(64,\)"),
    "unknown": (lambda p, s: _save(p, "model.safetensors", {**s, "transformer.layers.2.mlp.dense_h_to_4h.bias": torch.zeros(256)}),
                ValueError, r"unexpected tensor 'transformer.layers.2.mlp.dense_h_to_4h.bias'"),
    "missing": (lambda p, s: _save(p, "model.safetensors", {k: v for k, v in s.items() if k != "lm_head.weight"}),
                ValueError, r"missing tensor\(s\) \['lm_head.weight'\]"),
    "not-finite": (lambda p, s: _save(p, "model.safetensors", {**s, "lm_head.weight": s["lm_head.weight"] * float("inf")}),
                   ValueError, r"tensor 'lm_head.weight' has NaN or infinite values"),
    "pickle": (lambda p, s: ((p / "model.safetensors").unlink(), torch.save({"x": Evil()}, p / "pytorch_model.bin")),
               ValueError, r"pytorch_model.bin: refused: not a plain tensor checkpoint loadable with torch.load\(weights_only=True\)"),
    "chatglm2": (lambda p, s: _rewrite_config(p, multi_query_attention=True, rmsnorm=True),
                 ValueError, r"config.json: keys \['multi_query_attention', 'rmsnorm'\] belong to the ChatGLM2/3"),
    "int4": (lambda p, s: _rewrite_config(p, quantization_bit=4), ValueError, r"quantization_bit 4"),
    "offset": (lambda p, s: (p / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000})),
               ValueError, r"mask_token_id \d+ is not the id of '\[MASK\]' in ice_text.model with num_image_tokens 20000"),
    "no-tokenizer": (lambda p, s: (p / "ice_text.model").unlink(), FileNotFoundError, r"no ice_text.model"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_bad_directories_are_refused_naming_the_problem(tmp_path, ice_text, case):
    _, state = chatglm_dir(tmp_path / "hf", ice_text, shards=1)
    breaks, error, message = BROKEN[case]
    breaks(tmp_path / "hf", state)
    with pytest.raises(error, match=message):
        import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)
    assert not (tmp_path / "ckpt").exists()


def test_index_naming_a_missing_shard_is_refused(tmp_path, ice_text):
    chatglm_dir(tmp_path / "hf", ice_text, fmt="bin", shards=2)
    (tmp_path / "hf" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin .named in the index. not found"):
        import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)


def test_image_token_offset_defaults_to_the_published_20000(tmp_path, ice_text):
    """Without tokenizer_config.json, ChatGLMTokenizer shifts ids by 20000 (the first release's
    vocabulary of 150528 rows); the checkpoint's tokenizer gives those ids."""
    cfg, _ = chatglm_dir(tmp_path / "hf", ice_text, image_tokens=20000, shards=1)
    (tmp_path / "hf" / "tokenizer_config.json").unlink()
    import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)
    _, tokenizer = load_inference_checkpoint(tmp_path / "ckpt")
    assert tokenizer.special.mask == cfg["mask_token_id"] and tokenizer.special.mask >= 20000
    assert tokenizer.decode(list(range(5)) + tokenizer.encode("你好")) == "你好"  # image ids decode to nothing


CHATGLM_TEXTS = ["话说天下大势，分久必合。", "def f(x):\n    return  x\t+ 1\n\n", "GLM-130B 是一个 bilingual 模型。\n  Emoji: 😀"]


def test_chatglm_vocabulary_encodes_as_the_published_tokenizer(tmp_path, ice_text):
    import sentencepiece as spm

    chatglm_dir(tmp_path / "hf", ice_text, image_tokens=100, shards=1)
    import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)
    _, tokenizer = load_inference_checkpoint(tmp_path / "ckpt")
    sp = spm.SentencePieceProcessor(model_proto=ice_text)
    for text in CHATGLM_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == [i + 100 for i in sp.encode(chatglm_preprocess(text))]  # SPTokenizer.encode
        assert tokenizer.decode(ids) == text
        assert len(text) <= len(ids) * tokenizer.max_piece_chars
    assert tokenizer.encode_batch(CHATGLM_TEXTS) == [tokenizer.encode(t) for t in CHATGLM_TEXTS]
    assert tokenizer.max_piece_chars >= 80  # <|blank_80|> stands for 80 spaces
    special = set(vars(tokenizer.special).values())
    for text in ["say [gMASK] or <sop>, <eop>, [MASK], </s>, <pad>", "<eop><sop>[sMASK]"]:
        ids = tokenizer.encode(text)
        assert not special & set(ids) and tokenizer.decode(ids) == text  # control strings typed stay text
    ids, masks = tokenizer.encode_with_masks("The [MASK] fox, not <sop>")
    assert masks == 1 and tokenizer.special.mask in ids and tokenizer.special.sop not in ids
    assert tokenizer.decode(ids) == "The [MASK] fox, not <sop>"


def test_imported_model_chats_quantizes_and_serves(tmp_path, ice_text):
    """What quantize and serve do with a checkpoint, on an imported one: glm's chat, the streaming
    conversion to INT8, and the serving engine (its streamed text is the tokenizer's decoding)."""
    from glm.generation import GenerationConfig, SpanQuery, chat, generate_spans
    from glm.quantization import QuantSpec, quantize_checkpoint
    from stages.serve.engine import DecodeEngine, wait_for

    chatglm_dir(tmp_path / "hf", ice_text, shards=1)
    import_chatglm(str(tmp_path / "hf"), str(tmp_path / "ckpt"), **quiet)
    quantize_checkpoint(tmp_path / "ckpt", tmp_path / "int8", QuantSpec(bits=8), progress=lambda _: None)
    config = GenerationConfig(max_new_tokens=6)
    for path in ("ckpt", "int8"):
        model, tokenizer = load_inference_checkpoint(tmp_path / path)
        response, history = chat(model, tokenizer, "你好", config=config)
        assert isinstance(response, str) and history == [("你好", response)]
        ids = tokenizer.encode("def f(x):\n    return x") + [tokenizer.special.gmask]
        query = SpanQuery(ids, len(ids) - 1, True)
        engine = DecodeEngine(model, tokenizer, max_batch_size=2)
        try:
            event = wait_for(engine, query, config, timeout=120)
        finally:
            engine.close()
        assert event.tokens == generate_spans(model, [query], tokenizer.special, config, vocab_limit=len(tokenizer))[0]
        assert event.text == tokenizer.decode(event.tokens)


def test_command_line(tmp_path, ice_text, capsys):
    chatglm_dir(tmp_path / "hf", ice_text)
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "reading model-00001-of-00002.safetensors (1/2)" in out and "imported" in out
    assert load_file(tmp_path / "ckpt" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "error: export destination" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "nothing: not a directory" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "glm.chatglm_hf", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "import" in help_text and "export" in help_text

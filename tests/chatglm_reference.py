"""A tiny ChatGLM-6B in its published Hugging Face layout, and a forward pass written from the
published modeling_chatglm.py (THUDM/chatglm-6b), independent of glm/model.py.

Used by the tests of glm.chatglm_hf: what they compare the imported model against. Everything
here follows the published code's conventions: sequence-first activations, the fused
query_key_value viewed as (seq, batch, heads, 3 * head_dim) and split per head, RoPE with its
inverse frequencies rounded to fp16, q scaled by 1 / (sqrt(d) * (layer + 1)) and the scores
multiplied back before an fp32 softmax, masked scores filled with -10000, DeepNorm residuals
`ln(x) * (2N)^0.5 + f(ln(x))`, the tanh GELU, and P-Tuning v2 prefixes as past keys/values.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]


def chatglm_preprocess(text: str) -> str:
    """SPTokenizer._preprocess of the published tokenization_chatglm.py."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def train_ice_text(texts: list[str], vocab_size: int = 1200) -> bytes:
    """A small SentencePiece model shaped like ChatGLM's ice_text.model: <unk> <s> </s> <pad> at
    0-3, the whitespace pieces and GLM's special tokens as user-defined symbols, a dummy prefix."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([chatglm_preprocess(t) for t in texts]), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", user_defined_symbols=WHITESPACE + SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>", byte_fallback=True,
        normalization_rule_name="identity", character_coverage=0.995, num_threads=1, minloglevel=2)
    return buffer.getvalue()


def tiny_config(ice_text: bytes, image_tokens: int, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                two_d: bool = True, pre_seq_len: int | None = None) -> dict:
    """config.json as published, with a tiny shape; token ids as the published tokenizer gives them
    (ice_text ids shifted by num_image_tokens)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=ice_text)
    ids = {"mask_token_id": "[MASK]", "gmask_token_id": "[gMASK]", "bos_token_id": "<sop>", "eos_token_id": "<eop>",
           "pad_token_id": "<pad>"}
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        **{key: sp.piece_to_id(piece) + image_tokens for key, piece in ids.items()},
        "hidden_size": hidden, "inner_hidden_size": 4 * hidden, "num_attention_heads": heads, "num_layers": layers,
        "layernorm_epsilon": 1e-05, "max_sequence_length": 128, "position_encoding_2d": two_d,
        # more rows than the tokenizer has ids, as 130528 for 130344 + 0 in the published model
        "vocab_size": 32 * math.ceil((len(sp) + image_tokens + 5) / 32),
        "pre_seq_len": pre_seq_len, "prefix_projection": False, "quantization_bit": 0,
        "torch_dtype": "float32", "use_cache": True,
    }


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights under the published names and shapes (biases and norms not trivial)."""
    g = torch.Generator().manual_seed(seed)
    h, inner, L, V = cfg["hidden_size"], cfg["inner_hidden_size"], cfg["num_layers"], cfg["vocab_size"]
    rotary = h // cfg["num_attention_heads"] // (2 if cfg["position_encoding_2d"] else 1)

    def rnd(*shape, std=0.05, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    state = {"transformer.word_embeddings.weight": rnd(V, h, std=1.0)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        state.update({
            p + "input_layernorm.weight": rnd(h, std=0.1, mean=1.0), p + "input_layernorm.bias": rnd(h),
            p + "attention.rotary_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)).half(),
            p + "attention.query_key_value.weight": rnd(3 * h, h, std=h ** -0.5),
            p + "attention.query_key_value.bias": rnd(3 * h, std=0.2),
            p + "attention.dense.weight": rnd(h, h, std=h ** -0.5), p + "attention.dense.bias": rnd(h),
            p + "post_attention_layernorm.weight": rnd(h, std=0.1, mean=1.0), p + "post_attention_layernorm.bias": rnd(h),
            p + "mlp.dense_h_to_4h.weight": rnd(inner, h, std=h ** -0.5), p + "mlp.dense_h_to_4h.bias": rnd(inner),
            p + "mlp.dense_4h_to_h.weight": rnd(h, inner, std=inner ** -0.5), p + "mlp.dense_4h_to_h.bias": rnd(h),
        })
    state["transformer.final_layernorm.weight"] = rnd(h, std=0.1, mean=1.0)
    state["transformer.final_layernorm.bias"] = rnd(h)
    state["lm_head.weight"] = rnd(V, h, std=0.3)
    if cfg.get("pre_seq_len"):
        state["transformer.prefix_encoder.embedding.weight"] = rnd(cfg["pre_seq_len"], 2 * L * h, std=1.0)
    return state


def write_chatglm_dir(path: Path, cfg: dict, state: dict[str, torch.Tensor], ice_text: bytes, image_tokens: int,
                      fmt: str = "safetensors", shards: int = 2) -> Path:
    """The directory as THUDM/chatglm-6b publishes it (shards + index, or one file when shards == 1)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]", "mask_token": "[MASK]",
         "pad_token": "<pad>", "unk_token": "<unk>", "num_image_tokens": image_tokens, "tokenizer_class": "ChatGLMTokenizer"}))
    (path / "ice_text.model").write_bytes(ice_text)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    ext, index = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" else ("bin", "pytorch_model.bin.index.json")
    weight_map = {}
    for n, group in enumerate(groups, start=1):
        if shards == 1:
            file = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
        else:
            file = f"{'model' if fmt == 'safetensors' else 'pytorch_model'}-{n:05d}-of-{shards:05d}.{ext}"
        tensors = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(tensors, str(path / file), metadata={"format": "pt"})
        else:
            torch.save(tensors, path / file)
        weight_map.update({k: file for k in group})
    if shards > 1:
        (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# --- the published forward pass ---------------------------------------------------------------


def published_inputs(input_ids: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, attention_mask) as ChatGLMModel.get_position_ids / get_masks build them:
    context = tokens before <sop> (bidirectional); Part B takes the mask's position, with block
    positions 1, 2, ... from <sop> on (2D). attention_mask True = masked."""
    B, T = input_ids.shape
    bos, mask, gmask = cfg["bos_token_id"], cfg["mask_token_id"], cfg["gmask_token_id"]
    attention = torch.ones(B, T, T).tril()
    positions, blocks = [], []
    for i, seq in enumerate(input_ids.tolist()):
        context = seq.index(bos)
        attention[i, :, :context] = 1
        mask_token = gmask if gmask in seq else mask
        pos = torch.arange(T)
        if cfg["position_encoding_2d"]:
            pos[context:] = seq.index(mask_token)
            blocks.append(torch.cat((torch.zeros(context, dtype=torch.long), torch.arange(T - context) + 1)))
        elif mask_token != gmask:
            pos[context:] = seq.index(mask_token)
        positions.append(pos)
    position_ids = torch.stack(positions)
    if cfg["position_encoding_2d"]:
        position_ids = torch.stack((position_ids, torch.stack(blocks)), dim=1)  # (B, 2, T)
    return position_ids, (attention[:, None] < 0.5)


def _rotate_half(x):
    x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotary(q, k, positions, rotary_dim):
    """apply_rotary_pos_emb_index with RotaryEmbedding's cos/sin table (inv_freq in fp16)."""
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))).half().float()
    t = torch.arange(int(positions.max()) + 1, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = F.embedding(positions, emb.cos()).unsqueeze(2)  # positions (seq, batch) -> (seq, batch, 1, d)
    sin = F.embedding(positions, emb.sin()).unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def published_logits(state: dict[str, torch.Tensor], cfg: dict, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ChatGLMForConditionalGeneration.forward (no cache, eval mode): logits (batch, seq, vocab)."""
    h, nh, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_layers"]
    hd, eps, alpha = h // nh, cfg["layernorm_epsilon"], (2 * L) ** 0.5
    B, T = input_ids.shape
    x = F.embedding(input_ids, state["transformer.word_embeddings.weight"]).transpose(0, 1)  # (seq, batch, h)
    prefix = None
    if cfg.get("pre_seq_len"):  # get_prompt: (batch, P, 2L, nh, hd) -> (2L, P, batch, nh, hd), split per layer
        P = cfg["pre_seq_len"]
        kv = state["transformer.prefix_encoder.embedding.weight"].unsqueeze(0).expand(B, -1, -1)
        prefix = kv.reshape(B, P, 2 * L, nh, hd).permute(2, 1, 0, 3, 4).split(2)
        attention_mask = torch.cat((torch.zeros(B, 1, T, P, dtype=torch.bool), attention_mask), dim=3)
    for i in range(L):
        p = f"transformer.layers.{i}."
        ln = F.layer_norm(x, (h,), state[p + "input_layernorm.weight"], state[p + "input_layernorm.bias"], eps)
        mixed = F.linear(ln, state[p + "attention.query_key_value.weight"], state[p + "attention.query_key_value.bias"])
        q, k, v = torch.split(mixed.view(T, B, nh, 3 * hd), hd, dim=-1)
        if cfg["position_encoding_2d"]:
            q1, q2 = q.chunk(2, dim=-1)
            k1, k2 = k.chunk(2, dim=-1)
            q1, k1 = _rotary(q1, k1, position_ids[:, 0, :].transpose(0, 1), hd // 2)
            q2, k2 = _rotary(q2, k2, position_ids[:, 1, :].transpose(0, 1), hd // 2)
            q, k = torch.cat((q1, q2), dim=-1), torch.cat((k1, k2), dim=-1)
        else:
            q, k = _rotary(q, k, position_ids.transpose(0, 1), hd)
        if prefix is not None:  # layer_past: concatenated before the keys, not rotated
            k, v = torch.cat((prefix[i][0], k), dim=0), torch.cat((prefix[i][1], v), dim=0)
        coeff = float(i + 1)
        scores = torch.einsum("sbnd,tbnd->bnst", q / (math.sqrt(hd) * coeff), k)
        scores = scores.masked_fill(attention_mask, -10000.0).float() * coeff
        probs = F.softmax(scores, dim=-1)
        context = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(T, B, h)
        x = ln * alpha + F.linear(context, state[p + "attention.dense.weight"], state[p + "attention.dense.bias"])
        ln = F.layer_norm(x, (h,), state[p + "post_attention_layernorm.weight"],
                          state[p + "post_attention_layernorm.bias"], eps)
        mlp = F.linear(_gelu(F.linear(ln, state[p + "mlp.dense_h_to_4h.weight"], state[p + "mlp.dense_h_to_4h.bias"])),
                       state[p + "mlp.dense_4h_to_h.weight"], state[p + "mlp.dense_4h_to_h.bias"])
        x = ln * alpha + mlp
    x = F.layer_norm(x, (h,), state["transformer.final_layernorm.weight"], state["transformer.final_layernorm.bias"], eps)
    return F.linear(x, state["lm_head.weight"]).permute(1, 0, 2)

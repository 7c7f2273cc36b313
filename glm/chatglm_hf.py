"""ChatGLM-6B's published Hugging Face layout in and out of the inference checkpoint.

    python -m glm.chatglm_hf import SRC DEST    # THUDM/chatglm-6b directory -> inference checkpoint
    python -m glm.chatglm_hf export SRC DEST    # inference checkpoint -> THUDM/chatglm-6b layout

The published layout (THUDM/chatglm-6b): `config.json` (ChatGLMConfig), the weights as
`pytorch_model-0000N-of-0000M.bin` shards with `pytorch_model.bin.index.json` (or safetensors:
`model.safetensors` / `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`),
`ice_text.model` (SentencePiece) and `tokenizer_config.json`. Pickled `.bin` shards are read
only with `torch.load(weights_only=True)`: plain tensors, never arbitrary objects.

What the conversion takes care of (checked against the published `modeling_chatglm.py`; the
proof is `tests/glm/test_chatglm_hf.py`, a reference forward pass written from that code):

- Fused query/key/value: ChatGLM views its `query_key_value` output as (..., heads, 3 * head_dim),
  so its rows are per head [q_h; k_h; v_h]; `glm.model` views them as (..., 3, heads, head_dim),
  rows [q; k; v]. Weight and bias rows are permuted both ways (`qkv_from_chatglm`, `qkv_to_chatglm`).
- RoPE: ChatGLM keeps the inverse frequencies in fp16 (`inv_freq.half()`), so the import sets
  `GLMConfig.rope_fp16_frequencies`; an export of a model without it is refused unless allowed
  (its angles would differ). The stored `rotary_emb.inv_freq` buffers are ignored, as ChatGLM's
  own loader ignores them. 2D RoPE (half of each head by position, half by block position),
  GELU (tanh form), DeepNorm alpha (2N)^0.5, the (layer + 1) softmax scaling and LayerNorm
  epsilon are the same in both models.
- Tokenizer: `ice_text.model` ids are shifted by `num_image_tokens` (tokenizer_config.json;
  20000 in the first release, 0 since); the import writes that many placeholder control pieces
  (`<image_i>`) in front, so the checkpoint's tokenizer gives the published ids, and checks the
  ids in config.json (mask, gmask, bos = <sop>, eos = <eop>, pad) against it.
  `glm.tokenizer.GLMTokenizer` recognises the vocabulary and applies ChatGLM's whitespace pieces.

Refused, with the reason: ChatGLM2/3 layouts, quantized checkpoints (quantization_bit), and on
export GeGLU, a RoPE base other than 10000, quantized or prefix-MLP checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from glm.checkpoint import verified_checkpoint, write_checkpoint, WEIGHTS_FILE
from glm.checkpoint_dir import local_path
from glm.config import GLMConfig
from glm.filesystems import from_uri, is_remote
from glm.model import GLMModel
from glm.tokenizer import CHATGLM_EOP, CHATGLM_SOP, EOS, GMASK, MASK, PAD, GLMTokenizer

CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ICE_TEXT = "ice_text.model"
SAFETENSORS_INDEX, SAFETENSORS_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
DEFAULT_IMAGE_TOKENS = 20000
"""ChatGLMTokenizer's `num_image_tokens` when tokenizer_config.json does not set it."""
ROPE_BASE = 10000.0
"""ChatGLM-6B's RotaryEmbedding base (fixed in its code)."""
SPECIAL_IDS = {"mask_token_id": MASK, "gmask_token_id": GMASK, "bos_token_id": CHATGLM_SOP,
               "eos_token_id": CHATGLM_EOP, "pad_token_id": PAD}
"""config.json's token ids and the ice_text pieces they name."""
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
CHATGLM2_KEYS = ("multi_query_attention", "rmsnorm", "padded_vocab_size", "kv_channels", "ffn_hidden_size")
"""config.json keys of ChatGLM2/3 (another architecture under the same model_type)."""

Progress = Callable[[str], None]


def _print(msg: str) -> None:
    print(f"[chatglm_hf] {msg}", flush=True)


# --- the fused query/key/value ----------------------------------------------------------------


def qkv_from_chatglm(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """ChatGLM's per-head rows [q_0; k_0; v_0; q_1; ...] -> glm.model's [q; k; v] (weight or bias)."""
    return t.reshape(num_heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def qkv_to_chatglm(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """glm.model's rows [q; k; v] -> ChatGLM's per head [q_h; k_h; v_h]."""
    return t.reshape(3, num_heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _is_qkv(name: str) -> bool:
    return name.endswith((".attention.query_key_value.weight", ".attention.query_key_value.bias"))


def _chatglm_name(name: str) -> str:
    """glm.model parameter name -> the published one."""
    return name if name == "lm_head.weight" else f"transformer.{name}"


def _glm_name(hf_name: str) -> str | None:
    """Published parameter name -> glm.model's; "" for the ignored RoPE buffers; None if unknown."""
    if hf_name.endswith(".attention.rotary_emb.inv_freq"):
        return ""
    if hf_name == "lm_head.weight":
        return hf_name
    return hf_name[len("transformer."):] if hf_name.startswith("transformer.") else None


# --- config.json ------------------------------------------------------------------------------


def glm_config_from_chatglm(hf: dict[str, Any], where: str) -> GLMConfig:
    """The GLMConfig of a ChatGLM-6B config.json; ValueError naming the file and key otherwise."""
    if hf.get("model_type") != "chatglm":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not 'chatglm' (ChatGLM-6B)")
    found = [k for k in CHATGLM2_KEYS if k in hf]
    if found:
        raise ValueError(f"{where}: keys {found} belong to the ChatGLM2/3 architecture (RMSNorm, multi-query "
                         f"attention, SwiGLU); only ChatGLM-6B (the first release) can be imported")
    required = ("hidden_size", "num_attention_heads", "num_layers", "vocab_size", "layernorm_epsilon",
                "max_sequence_length")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} of ChatGLM-6B's config")
    if hf.get("quantization_bit"):
        raise ValueError(f"{where}: quantization_bit {hf['quantization_bit']}: a quantized release (chatglm-6b-int4 / "
                         f"-int8) stores other tensors; import the full-precision weights and quantize them with "
                         f"stages.quantize")
    pre_seq_len = hf.get("pre_seq_len") or 0
    fields = {  # GLMConfig field: value, typed by GLMConfig.from_dict (errors name config.json and the field)
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_layers": hf["num_layers"],
        "num_heads": hf["num_attention_heads"], "ffn_hidden_size": hf.get("inner_hidden_size"), "ffn_type": "gelu",
        "position_encoding": "rope_2d" if hf.get("position_encoding_2d", True) else "rope_1d",
        "rope_base": ROPE_BASE, "rope_fp16_frequencies": True, "max_seq_len": hf["max_sequence_length"],
        "tie_word_embeddings": False, "layernorm_eps": hf["layernorm_epsilon"],
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "embedding_grad_shrink": 1.0,  # ChatGLM's fine-tuning code has none (it only changes gradients)
        "attention_softmax_fp32_scaling": True, "pre_seq_len": pre_seq_len,
        "prefix_projection": bool(hf.get("prefix_projection")) and pre_seq_len > 0,
    }
    return GLMConfig.from_dict(fields, where=where)


def chatglm_config(config: GLMConfig, tokenizer: GLMTokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """The published config.json for a GLMConfig."""
    s = tokenizer.special
    return {
        "architectures": ["ChatGLMModel"], "auto_map": AUTO_MAP,
        "bos_token_id": s.sop, "eos_token_id": s.eop, "mask_token_id": s.mask, "gmask_token_id": s.gmask,
        "pad_token_id": s.pad,
        "hidden_size": config.hidden_size, "inner_hidden_size": config.ffn_hidden_size,
        "layernorm_epsilon": config.layernorm_eps, "max_sequence_length": config.max_seq_len,
        "model_type": "chatglm", "num_attention_heads": config.num_heads, "num_layers": config.num_layers,
        "position_encoding_2d": config.uses_2d_positions, "pre_seq_len": config.pre_seq_len or None,
        "prefix_projection": config.prefix_projection, "quantization_bit": 0,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, "vocab_size": config.vocab_size,
    }


def export_problems(config: GLMConfig, allow_rope_difference: bool = False) -> list[str]:
    """Why a model's logits would differ under ChatGLM-6B's published code (empty: exportable)."""
    problems = []
    if config.ffn_type != "gelu":
        problems.append(f"ffn_type {config.ffn_type!r}: ChatGLM-6B's MLP is a plain GELU")
    if config.rope_base != ROPE_BASE:
        problems.append(f"rope_base {config.rope_base}: ChatGLM-6B's code fixes it at {ROPE_BASE:g}")
    if not config.rope_fp16_frequencies and not allow_rope_difference:
        problems.append("rope_fp16_frequencies is false: ChatGLM-6B's code rounds the RoPE frequencies to fp16, so "
                        "positions would rotate differently (train with that model option, or allow the difference)")
    if config.prefix_projection and config.prefix_hidden_size not in (0, config.hidden_size):
        problems.append(f"prefix_hidden_size {config.prefix_hidden_size}: ChatGLM-6B's prefix MLP is hidden_size wide")
    return problems


# --- ice_text.model ---------------------------------------------------------------------------


def _sentencepiece_proto(data: bytes, where: str):
    from sentencepiece import sentencepiece_model_pb2

    try:
        return sentencepiece_model_pb2.ModelProto.FromString(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{where}: not a SentencePiece model ({e.__class__.__name__})") from None


def with_image_tokens(ice_text: bytes, count: int) -> bytes:
    """The SentencePiece model with `count` control pieces <image_i> in front, so its ids are
    ChatGLMTokenizer's (text ids shifted by num_image_tokens); they never come out of encode."""
    from sentencepiece import sentencepiece_model_pb2

    proto = _sentencepiece_proto(ice_text, ICE_TEXT)
    if count == 0:
        return ice_text
    pieces = list(proto.pieces)
    del proto.pieces[:]
    for i in range(count):
        proto.pieces.add(piece=f"<image_{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL)
    proto.pieces.extend(pieces)
    spec = proto.trainer_spec
    for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if getattr(spec, field) >= 0:
            setattr(spec, field, getattr(spec, field) + count)
    return proto.SerializeToString()


def without_image_tokens(model_proto: bytes) -> tuple[bytes, int]:
    """(ice_text.model, num_image_tokens): the inverse of `with_image_tokens`."""
    proto = _sentencepiece_proto(model_proto, GLMTokenizer.MODEL_FILE)
    count = 0
    while count < len(proto.pieces) and proto.pieces[count].piece == f"<image_{count}>":
        count += 1
    if count == 0:
        return model_proto, 0
    pieces = list(proto.pieces)[count:]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    spec = proto.trainer_spec
    for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if getattr(spec, field) >= count:
            setattr(spec, field, getattr(spec, field) - count)
    return proto.SerializeToString(), count


def _import_tokenizer(local: Path, hf: dict[str, Any]) -> tuple[GLMTokenizer, int]:
    """(tokenizer giving the published ids, num_image_tokens), checked against config.json."""
    path = local / ICE_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"{local}: no {ICE_TEXT} (ChatGLM-6B's tokenizer) beside the weights")
    settings = _read_json(local / TOKENIZER_CONFIG) if (local / TOKENIZER_CONFIG).is_file() else {}
    image_tokens = settings.get("num_image_tokens", DEFAULT_IMAGE_TOKENS)
    if not isinstance(image_tokens, int) or image_tokens < 0:
        raise ValueError(f"{local / TOKENIZER_CONFIG}: num_image_tokens must be a non-negative integer, "
                         f"got {image_tokens!r}")
    model = with_image_tokens(path.read_bytes(), image_tokens)
    try:
        tokenizer = GLMTokenizer(model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if tokenizer.convention != "chatglm":
        raise ValueError(f"{path}: not ChatGLM-6B's ice_text vocabulary (no {CHATGLM_SOP} / {CHATGLM_EOP} pieces)")
    for key, piece in SPECIAL_IDS.items():
        ours = tokenizer.sp.piece_to_id(piece)
        if key in hf and hf[key] != ours:
            raise ValueError(f"{local / CONFIG}: {key} {hf[key]} is not the id of {piece!r} in {ICE_TEXT} with "
                             f"num_image_tokens {image_tokens} ({ours}): tokenizer_config.json and config.json "
                             f"disagree about the image-token offset")
    return tokenizer, image_tokens


# --- reading the weights ----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def weight_files(local: Path) -> dict[str, list[str]]:
    """{file: [tensor names]} of a published checkpoint directory (safetensors preferred)."""
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (local / index).is_file():
            weight_map = _read_json(local / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{local / index}: no weight_map")
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            return files
        if (local / single).is_file():
            return {single: []}  # names: whatever the file holds
    raise FileNotFoundError(f"{local}: no weights ({SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE})")


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weights file; a .bin only through torch.load(weights_only=True)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} (named in the index) not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as e:  # safetensors' SafetensorError is an OSError subclass
            raise ValueError(f"{path}: unreadable safetensors file: {e}") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors, RuntimeError for a damaged archive
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: refused: not a plain tensor checkpoint loadable with torch.load(weights_only=True) "
                         f"({e.__class__.__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    yield from state.items()


def read_chatglm_weights(local: Path, progress: Progress = _print) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(published name, tensor, file) of every tensor, file by file, checked against the index."""
    files = weight_files(local)
    for n, (file, names) in enumerate(sorted(files.items()), start=1):
        progress(f"reading {file} ({n}/{len(files)})")
        seen = set()
        for name, tensor in _read_file(local / file):
            if names and name not in names:
                raise ValueError(f"{local / file}: tensor {name!r} is not listed for this file in the index")
            seen.add(name)
            yield name, tensor, file
        absent = sorted(set(names) - seen)
        if absent:
            raise ValueError(f"{local / file}: tensor(s) {absent[:5]} listed in the index are missing from the file")


# --- import -----------------------------------------------------------------------------------


def _parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "keep"):
        return None
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r}: choose keep, {', '.join(dtypes)}")
    return dtypes[name]


def expected_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    """glm.model's parameter names and shapes for a config (built on the meta device)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in GLMModel(config).state_dict().items()}


def import_chatglm(src: str, dest: str, dtype: str | None = None, progress: Progress = _print) -> str:
    """Convert a ChatGLM-6B Hugging Face directory (local or URI) into an inference checkpoint at
    `dest`; `dtype` float32 / bfloat16 / float16 converts, None keeps the stored one. Returns `dest`."""
    cast = _parse_dtype(dtype)
    with _source_dir(src, progress) as local:
        hf = _read_json(local / CONFIG)
        config = glm_config_from_chatglm(hf, str(local / CONFIG))
        tokenizer, image_tokens = _import_tokenizer(local, hf)
        pieces = len(tokenizer)
        if pieces > config.vocab_size:
            raise ValueError(f"{local / CONFIG}: vocab_size {config.vocab_size} has fewer rows than the tokenizer's "
                             f"{pieces} ids ({ICE_TEXT} + {image_tokens} image tokens)")
        shapes = expected_shapes(config)
        tensors: dict[str, torch.Tensor] = {}
        for hf_name, tensor, file in read_chatglm_weights(local, progress):
            name = _glm_name(hf_name)
            if name == "":
                continue  # ChatGLM recomputes its RoPE buffers (and its loader ignores these)
            if name not in shapes:
                raise ValueError(f"{local / file}: unexpected tensor {hf_name!r} for ChatGLM-6B with {config.num_layers} "
                                 f"layers{' and P-Tuning v2 prefixes' if config.pre_seq_len else ''}")
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"{local / file}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected "
                                 f"{shapes[name]} from {CONFIG}")
            if not tensor.is_floating_point():
                raise ValueError(f"{local / file}: tensor {hf_name!r} is {tensor.dtype}, not floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{local / file}: tensor {hf_name!r} has NaN or infinite values")
            if name in tensors:
                raise ValueError(f"{local / file}: tensor {hf_name!r} appears twice")
            if _is_qkv(name):
                tensor = qkv_from_chatglm(tensor, config.num_heads)
            tensors[name] = (tensor if cast is None else tensor.to(cast)).contiguous()
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise ValueError(f"{local}: missing tensor(s) {[_chatglm_name(m) for m in missing[:8]]}"
                             f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}")
        metadata = {"imported_from": src, "layout": "chatglm-6b (Hugging Face)", "num_image_tokens": image_tokens,
                    "torch_dtype": hf.get("torch_dtype")}
        progress(f"writing inference checkpoint {dest} ({len(tensors)} tensors, "
                 f"{sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30:.2f} GiB)")
        write_checkpoint(dest, config, tensors, tokenizer.to_bytes(), metadata=metadata)
    progress(f"imported {src} -> {dest}")
    return dest


@contextmanager
def _source_dir(uri: str, progress: Progress) -> Iterator[Path]:
    """A local directory with the published files (a remote one copied to a temporary directory)."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: not a directory")
        yield path
        return
    import pyarrow.fs as pafs

    fs, root = from_uri(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)) if i.type == pafs.FileType.File]
    if not infos:
        raise FileNotFoundError(f"{uri}: no files")
    with tempfile.TemporaryDirectory() as tmp:
        for info in infos:
            progress(f"fetching {info.base_name} ({info.size / 2**20:.0f} MiB)")
            with fs.open_input_stream(info.path) as src, open(Path(tmp) / info.base_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        yield Path(tmp)


# --- export -----------------------------------------------------------------------------------


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def export_chatglm(src: str, dest: str, dtype: str | None = None, max_shard_bytes: int = 2 << 30,
                   allow_rope_difference: bool = False, progress: Progress = _print) -> str:
    """Write an inference checkpoint (local or URI) in ChatGLM-6B's published layout at `dest`
    (which must not exist): sharded safetensors with model.safetensors.index.json, config.json, and
    the tokenizer. Returns `dest`. ValueError when the model would not compute the same logits
    under ChatGLM-6B's code (`export_problems`) or is quantized."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cast = _parse_dtype(dtype)
    _refuse_existing(dest)
    with verified_checkpoint(src) as (local, config, _, spec):
        if spec is not None:
            raise ValueError(f"{src}: a quantized checkpoint ({spec.bits}-bit); export the full-precision one "
                             f"(ChatGLM's own int4/int8 releases use another format)")
        problems = export_problems(config, allow_rope_difference)
        if problems:
            raise ValueError(f"{src}: cannot be exported to ChatGLM-6B's layout: " + "; ".join(problems))
        tokenizer = GLMTokenizer.load(local / GLMTokenizer.MODEL_FILE)
        with safe_open(str(local / WEIGHTS_FILE), framework="pt") as f:
            stored = {name: f.get_slice(name) for name in f.keys()}
            out_dtype = cast or stored["word_embeddings.weight"].get_dtype()
            if isinstance(out_dtype, str):  # safetensors reports "F16", "BF16", "F32"
                out_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[out_dtype]
            names = list(expected_shapes(config)) + (["lm_head.weight"] if config.tie_word_embeddings else [])
            rotary = config.head_dim // 2 if config.uses_2d_positions else config.head_dim
            buffers = [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(config.num_layers)]
            width = torch.tensor([], dtype=out_dtype).element_size()
            sizes = [(n, math.prod(stored[n if n in stored else "word_embeddings.weight"].get_shape()) * width)
                     for n in names] + [(b, rotary // 2 * width) for b in buffers]
            shards = _plan_shards(sizes, max_shard_bytes)
            progress(f"exporting {src}: {len(sizes)} tensors in {len(shards)} shard(s) of at most "
                     f"{max_shard_bytes / 2**30:.2f} GiB, {out_dtype}")
            inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
            with _staged(dest) as staging:
                weight_map: dict[str, str] = {}
                for n, shard in enumerate(shards, start=1):
                    file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                    tensors = {}
                    for name in shard:
                        if name in buffers:  # as ChatGLM stores them (its loader recomputes them anyway)
                            tensors[name] = inv_freq.half().to(out_dtype)
                            continue
                        if name not in stored:  # a tied output layer is stored once, as the embedding
                            tensor = f.get_tensor("word_embeddings.weight").clone()
                        else:
                            tensor = f.get_tensor(name)
                        if _is_qkv(name):
                            tensor = qkv_to_chatglm(tensor, config.num_heads)
                        tensors[_chatglm_name(name)] = tensor.to(out_dtype).contiguous()
                    save_file(tensors, str(staging / file), metadata={"format": "pt"})
                    weight_map.update({name: file for name in tensors})
                    progress(f"wrote {file} ({n}/{len(shards)})")
                total = sum(size for _, size in sizes)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
                (staging / CONFIG).write_text(json.dumps(chatglm_config(config, tokenizer, out_dtype), indent=2))
                _export_tokenizer(tokenizer, staging, progress)
    progress(f"exported {src} -> {dest}")
    return dest


def _export_tokenizer(tokenizer: GLMTokenizer, staging: Path, progress: Progress) -> None:
    if tokenizer.convention != "chatglm":
        (staging / GLMTokenizer.MODEL_FILE).write_bytes(tokenizer.to_bytes())
        progress(f"the tokenizer is this project's own ({GLMTokenizer.MODEL_FILE}), not ChatGLM's ice_text: "
                 f"ChatGLMTokenizer cannot read it; use glm.tokenizer.GLMTokenizer")
        return
    ice_text, image_tokens = without_image_tokens(tokenizer.to_bytes())
    (staging / ICE_TEXT).write_bytes(ice_text)
    settings = {
        "bos_token": CHATGLM_SOP, "eos_token": CHATGLM_EOP, "end_token": EOS, "gmask_token": GMASK,
        "mask_token": MASK, "pad_token": PAD, "unk_token": "<unk>", "remove_space": False, "do_lower_case": False,
        "num_image_tokens": image_tokens, "padding_side": "left", "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (staging / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2))


def _refuse_existing(dest: str) -> None:
    if is_remote(dest):
        import pyarrow.fs as pafs

        fs, path = from_uri(dest)
        exists = fs.get_file_info(path).type != pafs.FileType.NotFound
    else:
        exists = local_path(dest).exists()
    if exists:
        raise FileExistsError(f"export destination {dest} exists; choose a new directory")


@contextmanager
def _staged(dest: str) -> Iterator[Path]:
    """A staging directory that becomes `dest` only once complete (a local rename; remote: a copy)."""
    if is_remote(dest):
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
            fs, path = from_uri(dest)
            fs.create_dir(path, recursive=True)
            pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    final = local_path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm.chatglm_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="ChatGLM-6B Hugging Face directory -> inference checkpoint")
    imp.add_argument("src", help="directory (or URI) with config.json, ice_text.model and the weights")
    imp.add_argument("dest", help="inference checkpoint to write (path or URI; replaced if it exists)")
    imp.add_argument("--dtype", default="keep", help="keep (default), float32, bfloat16 or float16")
    exp = sub.add_parser("export", help="inference checkpoint -> ChatGLM-6B Hugging Face layout")
    exp.add_argument("src", help="inference checkpoint (path or URI)")
    exp.add_argument("dest", help="new directory (or URI) to write")
    exp.add_argument("--dtype", default="keep", help="keep (default), float32, bfloat16 or float16")
    exp.add_argument("--max-shard-gib", type=float, default=2.0, help="largest safetensors shard (default 2)")
    exp.add_argument("--allow-rope-difference", action="store_true",
                     help="export a model trained without rope_fp16_frequencies (ChatGLM's code would rotate "
                          "positions slightly differently)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            import_chatglm(args.src, args.dest, dtype=args.dtype)
        else:
            export_chatglm(args.src, args.dest, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gib * 2**30),
                           allow_rope_difference=args.allow_rope_difference)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight-only INT8 / INT4 quantization of a GLM model (GLM_SPEC.md section 4): the public
names. The scheme (GLM-130B's absmax per output row, optional groups, INT4 packed two per byte)
and the quantized layers are in `glm.int_quant`, re-exported here.

- `quantize_model(model, spec)` swaps those layers for `QuantizedLinear` in place;
- `quantize_checkpoint(src, dst, spec)` converts an inference checkpoint tensor by tensor
  (safetensors `safe_open`), so the full-precision model is never in memory, let alone twice;
- `glm.checkpoint.load_inference_checkpoint` loads FP and quantized checkpoints alike.

The scheme and the layers live in `glm.int_quant` (re-exported here), which `glm.checkpoint`
imports; the conversion below imports `glm.checkpoint`. No import circle.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from glm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, _fetched, _parse_config, write_checkpoint
from glm.int_quant import (  # noqa: F401  (the public names of weight-only quantization)
    BLOCK_LINEARS, QuantizedLinear, QuantSpec, block_linear_names, cast_model, fp16_linear_weight_bytes,
    linear_weight_bytes, model_quantization, num_groups, prepare_quantized, quantize_model, quantize_weight)

__all__ = ["BLOCK_LINEARS", "QuantSpec", "QuantizedLinear", "block_linear_names", "cast_model", "fp16_linear_weight_bytes",
           "linear_weight_bytes", "model_quantization", "num_groups", "prepare_quantized", "quantize_checkpoint",
           "quantize_model", "quantize_weight"]


# --- streaming checkpoint conversion -------------------------------------------------------


def _is_block_linear_weight(key: str) -> bool:
    parts = key.split(".")
    return (len(parts) == 5 and parts[0] == "layers" and parts[-1] == "weight"
            and ".".join(parts[2:4]) in BLOCK_LINEARS)


@torch.no_grad()
def quantize_checkpoint(
    src: str | Path, dst: str | Path, spec: QuantSpec, metadata: dict[str, Any] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize the inference checkpoint at `src` into a new one at `dst`, tensor by tensor.

    Each tensor is read alone with safetensors' `safe_open` and either quantized (block linear
    weights) or passed through, so peak memory is one full-precision tensor plus the output.
    Returns a report: linear-weight bytes before (as stored, and as fp16) and after, counts.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    src_bytes = fp16_bytes = dst_bytes = 0
    quantized = 0
    start = time.perf_counter()
    with _fetched(str(src)) as local:
        config, src_meta, src_spec = _parse_config(local / CONFIG_FILE)
        if src_spec is not None:
            raise ValueError(f"{src} is already quantized ({src_spec.name}): quantize a full-precision checkpoint")
        tokenizer_bytes = (local / "tokenizer.model").read_bytes()
        with safe_open(str(local / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for i, key in enumerate(keys):
                tensor = f.get_tensor(key)
                if not _is_block_linear_weight(key):
                    out[key] = tensor
                    continue
                qweight, scales = quantize_weight(tensor, spec)
                out[key], out[key.removesuffix("weight") + "weight_scale"] = qweight, scales
                src_bytes += tensor.numel() * tensor.element_size()
                fp16_bytes += tensor.numel() * 2
                dst_bytes += qweight.numel() + scales.numel() * 2
                quantized += 1
                del tensor
                if quantized % 8 == 0 or i == len(keys) - 1:
                    progress(f"[quantize] {spec.name}: {quantized} linear weights done ({key}), "
                             f"{time.perf_counter() - start:.1f}s")
    expected = 4 * config.num_layers
    if quantized != expected:
        raise ValueError(f"{src}: found {quantized} block linear weights, expected {expected} "
                         f"({config.num_layers} layers x {len(BLOCK_LINEARS)})")
    write_checkpoint(dst, config, out, tokenizer_bytes, {**src_meta, **(metadata or {})}, spec)
    progress(f"[quantize] converted {spec.name} checkpoint written to {dst}")
    return {"linear_bytes_source": src_bytes, "linear_bytes_fp16": fp16_bytes, "linear_bytes_quantized": dst_bytes,
            "memory_ratio": dst_bytes / fp16_bytes, "quantized_tensors": quantized}

"""Weight-only INT8 / INT4 quantization of a GLM model (GLM_SPEC.md section 4).

Scheme (GLM-130B's): symmetric absmax per output row, `scale = max|W[row]| / (2^(b-1) - 1)`
kept in fp16, `q = round(W / scale)`; optionally one scale per row and group of
`group_size` input columns. INT4 packs two values per byte (`kernels.quant_matmul`).
Quantized: the four linear layers of every block (`BLOCK_LINEARS`); embeddings, norms,
biases, the output head and any other module (e.g. a P-Tuning `prefix_encoder`) stay as
they are.

- `quantize_model(model, spec)` swaps those layers for `QuantizedLinear` in place;
- `glm.quantization.quantize_checkpoint` converts an inference checkpoint tensor by tensor;
- `glm.checkpoint.load_inference_checkpoint` loads FP and quantized checkpoints alike.

This module knows nothing of checkpoints (glm.checkpoint imports it; glm.quantization, the
public face, imports both).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from kernels.quant_matmul import pack_int4, quantized_matmul

BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
"""The linear layers of each block that are quantized, relative to `layers.<i>`."""


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized; stored as the `quantization` entry of a checkpoint's config.json."""

    bits: int = 4
    """8 (int8 per weight) or 4 (two weights per byte)."""
    group_size: int = 0
    """0: one scale per output row (GLM-130B); else one per row and this many input columns."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size < 0 or (self.group_size and self.group_size % 2):
            raise ValueError(f"quantization group_size must be 0 (per row) or a positive even number, "
                             f"got {self.group_size}")

    @property
    def scheme(self) -> str:
        return "absmax_per_group" if self.group_size else "absmax_per_row"

    @property
    def name(self) -> str:
        """Short label for reports: int8, int4, int4-g128 ..."""
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scheme": self.scheme}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "quantization") -> "QuantSpec":
        try:
            spec = cls(bits=int(data["bits"]), group_size=int(data.get("group_size", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid quantization entry {data!r}: {e}") from None
        if data.get("scheme", spec.scheme) != spec.scheme:
            raise ValueError(f"{where}: scheme {data['scheme']!r} does not match group_size {spec.group_size}")
        return spec


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else -(-in_features // group_size)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (qweight int8 (N, K) or packed (N, ceil(K/2)), scales fp16 (N, G)).

    The scale is rounded to fp16 first (upwards where rounding down would push the row's
    absmax beyond the integer range), and the weight is divided by that rounded scale, so
    dequantization error is at most half a step everywhere.
    """
    N, K = weight.shape
    qmax = 2 ** (spec.bits - 1) - 1
    w = weight.detach().float()
    G = num_groups(K, spec.group_size)
    if spec.group_size:
        w = nn.functional.pad(w, (0, G * spec.group_size - K)).view(N, G, spec.group_size)
    else:
        w = w.reshape(N, 1, K)
    absmax = w.abs().amax(dim=-1)  # (N, G)
    scales = (absmax / qmax).half()
    too_small = scales.float() * qmax < absmax
    scales = torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales).float()  # all-zero rows stay 0
    q = torch.round(w / divisor[..., None]).clamp_(-qmax, qmax).to(torch.int8).view(N, -1)[:, :K]
    return (pack_int4(q) if spec.bits == 4 else q.contiguous()), scales


class QuantizedLinear(nn.Module):
    """A frozen linear layer with integer weights and fp16 scales: y = x @ (q * s).T + b.

    State: `weight` int8 (N, K) or packed INT4 (N, ceil(K/2)); `weight_scale` fp16 (N, G);
    `bias` in the model's dtype. The matmul goes through `kernels.quant_matmul` (Triton on
    CUDA, dequantize-then-matmul elsewhere).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        cols = (in_features + 1) // 2 if spec.bits == 4 else in_features
        self.register_buffer("weight", torch.zeros(out_features, cols, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(
            out_features, num_groups(in_features, spec.group_size), dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantizedLinear":
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, spec, linear.bias is not None, w.device, w.dtype)
        module.weight, module.weight_scale = quantize_weight(w, spec)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_matmul(x, self.weight, self.weight_scale, bits=self.spec.bits,
                                group_size=self.spec.group_size, in_features=self.in_features, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}, "
                f"bias={self.bias is not None}")


def block_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the quantizable linear layers, e.g. 'layers.0.attention.dense'."""
    return [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in BLOCK_LINEARS]


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace every block's four linear layers with `QuantizedLinear` in place; returns the model."""
    for name in block_linear_names(model):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear: already quantized, or "
                            f"wrapped (e.g. LoRA: merge the adapters into the weights first)?")
        _swap(model, name, QuantizedLinear.from_linear(linear, spec))
    return model


def prepare_quantized(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap in empty `QuantizedLinear` modules of the right shapes (for loading a quantized
    state dict; works on the meta device)."""
    for name in block_linear_names(model):
        linear = model.get_submodule(name)
        _swap(model, name, QuantizedLinear(linear.in_features, linear.out_features, spec,
                                           linear.bias is not None, linear.weight.device, linear.weight.dtype))
    return model


def model_quantization(model: nn.Module) -> QuantSpec | None:
    """The spec of a model's quantized layers, or None for a full-precision model."""
    specs = {m.spec for m in model.modules() if isinstance(m, QuantizedLinear)}
    if len(specs) > 1:
        raise ValueError(f"model mixes quantization specs {sorted(s.name for s in specs)}")
    return specs.pop() if specs else None


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)`, except quantization scales stay fp16 (bf16 would drop 3 bits of each)."""
    scales = {m: m.weight_scale for m in model.modules() if isinstance(m, QuantizedLinear)}
    model.to(dtype)
    for module, scale in scales.items():
        module.weight_scale = scale
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the block linear weights (integers plus scales when quantized; biases excluded)."""
    total = 0
    for name in block_linear_names(model):
        m = model.get_submodule(name)
        tensors = (m.weight, m.weight_scale) if isinstance(m, QuantizedLinear) else (m.weight,)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def fp16_linear_weight_bytes(model: nn.Module) -> int:
    """What the block linear weights take in fp16: the baseline of the memory ratios."""
    return sum(2 * m.out_features * m.in_features for m in map(model.get_submodule, block_linear_names(model)))

"""INT4 weight-only matmul (the Triton W4A16 kernel) against fp16 `torch.matmul` on one GPU.

    python benchmarks/int4_kernel.py [--group-size 128] [--reps 100]

Shapes (in x out features): 4096 x 4096, 4096 x 16384, 12288 x 32768; batches 1, 16, 64;
random weights quantized per row (and per group of --group-size columns). Each case is first
checked against the pure-torch reference, then timed with triton.testing.do_bench (median).
Effective bandwidth = bytes the kernel must move (packed weights + scales + activations +
output) / time, compared with a device-to-device copy measured in the same run.

Last line, one JSON object: per-case times and speedups, `speedup_b1` / `speedup_b16` /
`speedup_b64` (the smallest over the shapes), `ratio` (= speedup_b1), `bandwidth_fraction`
(batch 1, the smallest over the shapes), and the goals (H100: >= 3x at batch 1, >= 2.5x at
batch 16, >= 75% of copy bandwidth). Without CUDA it prints a JSON line saying so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = [(4096, 4096), (4096, 16384), (12288, 32768)]
BATCHES = [1, 16, 64]
GOALS = {"speedup_b1": 3.0, "speedup_b16": 2.5, "bandwidth_fraction": 0.75}


def copy_bandwidth(torch, do_bench, device="cuda", size: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy of `size` bytes (read + write)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=200)
    return 2 * src.numel() / (ms * 1e-3)


def host_bench(fn, rep: int = 100, warmup: int = 2, max_iters: int = 1000) -> float:
    """Median milliseconds of fn() with a host timer: do_bench's stand-in where there is no CUDA
    (the dry run); `rep` is the time budget in ms."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times, deadline = [], time.perf_counter() + rep / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def layer_shapes(preset_name: str) -> list[tuple[str, int, int]]:
    """(name, K in, N out) of the four linear layers of one block of a preset."""
    from glm.config import preset

    c = preset(preset_name)
    h, ffn = c.hidden_size, c.ffn_hidden_size
    return [("query_key_value", h, 3 * h), ("dense", h, h),
            ("dense_h_to_4h", h, 2 * ffn if c.ffn_type == "geglu" else ffn), ("dense_4h_to_h", ffn, h)]


def time_case(torch, bench, K: int, N: int, M: int, bits: int, group: int, reps: int, bandwidth: float,
              device="cuda", baselines=("float16",), tolerance: float = 5e-3) -> dict:
    """One W{bits}A16 case through the dispatch point forced to Triton, checked against the pure
    torch reference, then timed against `torch.matmul` in each baseline dtype (activations fp16)."""
    from glm.quantization import QuantSpec, quantize_weight
    from kernels.quant_matmul import quantized_matmul, quantized_matmul_reference, use_impl

    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(N, K, device=device, generator=g) / K ** 0.5).half()
    spec = QuantSpec(bits, group)
    qweight, scales = quantize_weight(w, spec)
    kw = dict(bits=bits, group_size=group, in_features=K)
    x = torch.randn(M, K, device=device, dtype=torch.float16, generator=g)
    with use_impl("triton"):
        y = quantized_matmul(x, qweight, scales, **kw)
    ref = quantized_matmul_reference(x.float(), qweight, scales, **kw)
    rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    if rel > tolerance:
        raise SystemExit(f"W{bits}A16 kernel disagrees with the reference at M={M} K={K} N={N} "
                         f"group={group}: relative error {rel:.2e}")
    case = {"K": K, "N": N, "M": M, "bits": bits, "scales": spec.scheme}
    for name in baselines:
        wd, xd = w.to(getattr(torch, name)), x.to(getattr(torch, name))
        case[f"{name}_ms"] = round(bench(lambda: torch.matmul(xd, wd.T), rep=reps), 4)
    with use_impl("triton"):
        ms = bench(lambda: quantized_matmul(x, qweight, scales, **kw), rep=reps)
    moved = qweight.numel() + scales.numel() * 2 + x.numel() * 2 + M * N * 2
    case.update({f"int{bits}_ms": round(ms, 4), "speedup": round(case[f"{baselines[0]}_ms"] / ms, 3),
                 "bandwidth_fraction": round(moved / (ms * 1e-3) / bandwidth, 3), "max_rel_error": float(f"{rel:.2e}")})
    for name in baselines[1:]:
        case[f"speedup_vs_{name}"] = round(case[f"{name}_ms"] / ms, 3)
    return case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=100, help="do_bench rep time in ms per case")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("int4_kernel: no CUDA GPU on this machine; this benchmark times the Triton kernel on a GPU only",
              file=sys.stderr)
        print(json.dumps({"benchmark": "int4_kernel", "skipped": "no CUDA GPU", "goal": GOALS}))
        return 1

    from triton.testing import do_bench

    device_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(torch, do_bench)
    print(f"{device_name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    cases = []
    for K, N in SHAPES:
        for group in (0, args.group_size):
            for M in BATCHES:
                case = time_case(torch, do_bench, K, N, M, 4, group, args.reps, bandwidth)
                case["fp16_ms"] = case.pop("float16_ms")
                cases.append(case)
                print(f"  {K}x{N} batch {M:>2} {case['scales']:16s}: fp16 {case['fp16_ms']:.4f} ms, int4 "
                      f"{case['int4_ms']:.4f} ms, {case['speedup']:.2f}x, {case['bandwidth_fraction']:.0%} of copy "
                      f"bandwidth", flush=True)

    def worst(M: int, key: str) -> float:
        return min(c[key] for c in cases if c["M"] == M and c["scales"] == "absmax_per_row")

    result = {"benchmark": "int4_kernel", "device": device_name, "copy_GBps": round(bandwidth / 1e9, 1),
              "speedup_b1": worst(1, "speedup"), "speedup_b16": worst(16, "speedup"), "speedup_b64": worst(64, "speedup"),
              "bandwidth_fraction": worst(1, "bandwidth_fraction"), "ratio": worst(1, "speedup"),
              "baseline": "fp16 torch.matmul", "goal": GOALS, "cases": cases}
    result["goal_met"] = {k: result[k] >= v for k, v in GOALS.items()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

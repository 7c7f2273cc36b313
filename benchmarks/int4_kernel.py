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


def copy_bandwidth(torch, do_bench) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=200)
    return 2 * src.numel() / (ms * 1e-3)


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

    from glm.quantization import QuantSpec, quantize_weight
    from kernels.quant_matmul import quantized_matmul, quantized_matmul_reference, use_impl

    device_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(torch, do_bench)
    print(f"{device_name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    cases = []
    for K, N in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device="cuda") / K ** 0.5).half()
        for group in (0, args.group_size):
            spec = QuantSpec(4, group)
            qweight, scales = quantize_weight(w, spec)
            kw = dict(bits=4, group_size=group, in_features=K)
            for M in BATCHES:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                with use_impl("triton"):
                    y = quantized_matmul(x, qweight, scales, **kw)
                ref = quantized_matmul_reference(x.float(), qweight, scales, **kw)
                rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if rel > 5e-3:
                    raise SystemExit(f"int4 kernel disagrees with the reference at M={M} K={K} N={N} "
                                     f"group={group}: relative error {rel:.2e}")
                fp16_ms = do_bench(lambda: torch.matmul(x, w.T), rep=args.reps)
                with use_impl("triton"):
                    int4_ms = do_bench(lambda: quantized_matmul(x, qweight, scales, **kw), rep=args.reps)
                moved = qweight.numel() + scales.numel() * 2 + x.numel() * 2 + M * N * 2
                case = {"K": K, "N": N, "M": M, "scales": spec.scheme, "fp16_ms": round(fp16_ms, 4),
                        "int4_ms": round(int4_ms, 4), "speedup": round(fp16_ms / int4_ms, 3),
                        "bandwidth_fraction": round(moved / (int4_ms * 1e-3) / bandwidth, 3),
                        "max_rel_error": float(f"{rel:.2e}")}
                cases.append(case)
                print(f"  {K}x{N} batch {M:>2} {spec.scheme:16s}: fp16 {fp16_ms:.4f} ms, int4 {int4_ms:.4f} ms, "
                      f"{case['speedup']:.2f}x, {case['bandwidth_fraction']:.0%} of copy bandwidth", flush=True)

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

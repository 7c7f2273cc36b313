"""The optimizer step of ZeRO CPU offload: torch's AdamW (the engine's default, nothing to
compile) against DeepSpeed's compiled CPU Adam (`cpu_adam: true`), on the same fp32 state.

    python benchmarks/offload_optimizer.py [--params 50e6] [--steps 10] [--threads N]

With offload, DeepSpeed steps the fp32 master weights and Adam moments on the CPU after each
accumulation boundary, so this step time is paid once per optimizer step. Prints progress,
then one JSON line: seconds per step of each, their ratio, the build time of CPU Adam (its
first use compiles a C++ extension with the machine's toolchain) and whether the two agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=50e6, help="fp32 parameters in the offloaded state")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.params)
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def state(seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(n, generator=g))
        p.grad = torch.randn(n, generator=g) * 1e-2
        return [p]

    def timed(optimizer, params) -> float:
        optimizer.step()  # first step allocates the moments
        t = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        return (time.perf_counter() - t) / args.steps

    print(f"{n / 1e6:.0f}M fp32 parameters, {torch.get_num_threads()} threads, {args.steps} steps each", flush=True)
    torch_params = state()
    torch_s = timed(torch.optim.AdamW(torch_params, **hyper), torch_params)
    print(f"  torch AdamW (foreach): {torch_s * 1e3:.1f} ms/step", flush=True)

    result = {"benchmark": "offload_optimizer", "params": n, "threads": torch.get_num_threads(),
              "torch_adamw_s_per_step": round(torch_s, 4)}
    try:
        t = time.perf_counter()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        ds_params = state()
        ds_opt = DeepSpeedCPUAdam(ds_params, adamw_mode=True, **hyper)
        build_s = time.perf_counter() - t
        print(f"  DeepSpeed CPU Adam built/loaded in {build_s:.1f}s", flush=True)
        ds_s = timed(ds_opt, ds_params)
        print(f"  DeepSpeed CPU Adam: {ds_s * 1e3:.1f} ms/step", flush=True)
        agree = bool(torch.allclose(torch_params[0], ds_params[0], rtol=1e-4, atol=1e-6))
        result.update({"cpu_adam_s_per_step": round(ds_s, 4), "cpu_adam_build_s": round(build_s, 1),
                       "cpu_adam_speedup": round(torch_s / ds_s, 3), "results_agree": agree})
    except Exception as e:  # no toolchain: the engine's default needs none
        print(f"  DeepSpeed CPU Adam unavailable: {type(e).__name__}: {e}", flush=True)
        result["cpu_adam_error"] = f"{type(e).__name__}: {e}"[:300]
    result["baseline"] = "torch AdamW on the same state"
    result["goal"] = "choose the faster as the default; document the other"
    print(json.dumps(result))


if __name__ == "__main__":
    main()

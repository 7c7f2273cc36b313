"""Training engine throughput against a bare PyTorch loop: same model, batch, threads, same run.

    python benchmarks/train_throughput.py [--preset small] [--steps 40] [--seq-len 256] [--micro-batch 4]

The engine runs 1 Ray Train worker (DeepSpeed, ZeRO stage 0, --precision; the GPU when there
is one) with all the machine's cores; the bare loop is torch AdamW + clipping in this process
on the same device (autocast for bf16 / fp16) with the same thread count. Steady-state tokens/s from per-step times, the first 3 steps excluded.
Prints progress, then one JSON line: tokens_per_s, baseline_tokens_per_s, ratio, goal.
On a GPU machine also `mfu` (against --peak-flops, default 989e12 = H100 bf16 dense).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sample_data import build_sample_data

WARMUP = 3


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    """Wait for queued GPU work, so a host timer measures it (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def to_batch(rows: dict, device) -> dict:
    """Rows of the sample schema (numpy) as long tensors on `device`."""
    import torch

    return {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in rows.items()}


def autocast(device, precision: str):
    """bf16 / fp16 autocast on the device (fp32 master weights, like the engine's mixed precision)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def bare_loop(config, data: str, steps: int, micro: int, lr: float, threads: int, device=None,
              precision: str = "fp32") -> float:
    """Tokens/s of torch AdamW + clipping on the model library, on `device` (default: CUDA when
    there is one); steps after WARMUP are timed, with the device synchronised."""
    import torch

    from glm.model import GLMModel
    from stages.engine.data import ShardSource

    device = device or default_device()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GLMModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    source = ShardSource(data)
    consumed, tokens, seconds = 0, 0, 0.0
    for step in range(steps):
        indices, consumed = source.indices(consumed, micro)
        rows = source.rows(indices)
        sync(device)
        t = time.perf_counter()
        batch = to_batch(rows, device)
        with autocast(device, precision):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sync(device)
        if step >= WARMUP:
            seconds += time.perf_counter() - t
            tokens += int((rows["segment_ids"] != 0).sum())
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--peak-flops", type=float, default=989e12)
    args = parser.parse_args()

    from glm.config import ModelSpec
    from stages.engine import EngineConfig, OptimConfig, TrainSpec, fit, lm_loss_step
    from stages.engine.trainer import final_steps
    from stages.pretrain.config import PretrainConfig
    from stages.pretrain.stage import build_model, flops_per_token, model_config

    threads = os.cpu_count() or 1
    device = default_device()
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        data = build_sample_data(work, seq_len=args.seq_len)
        config = model_config(PretrainConfig(data=data, output="", model=ModelSpec(args.preset)))
        print(f"bare PyTorch loop: {args.preset}, {args.steps} steps of {args.micro_batch} x {args.seq_len}, "
              f"{threads} threads, {device}, {args.precision} ...", flush=True)
        baseline = bare_loop(config, data, args.steps, args.micro_batch, 6e-4, threads, device, args.precision)
        print(f"  {baseline:,.0f} tokens/s", flush=True)

        print("engine: 1 Ray Train worker, DeepSpeed ZeRO-0 ...", flush=True)
        cfg = EngineConfig(run_name="throughput", storage_path=str(work / "ray"), num_workers=1,
                           cpus_per_worker=float(threads), micro_batch_size=args.micro_batch, train_steps=args.steps,
                           zero_stage=0, precision=args.precision, optim=OptimConfig(lr=6e-4, warmup_steps=5),
                           checkpoint_every=args.steps, log_every=10)
        spec = TrainSpec(model_factory=functools.partial(build_model, config), data_uri=data, step_fn=lm_loss_step)
        fit(spec, cfg)
        steps = [r for s, r in sorted(final_steps(cfg).items()) if s > WARMUP]
        tokens_per_s = sum(r["tokens"] for r in steps) / sum(r["seconds"] for r in steps)
        print(f"  {tokens_per_s:,.0f} tokens/s", flush=True)
        result = {"benchmark": "train_throughput", "preset": args.preset, "seq_len": args.seq_len,
                  "micro_batch": args.micro_batch, "threads": threads, "device": device, "precision": args.precision,
                  "tokens_per_s": round(tokens_per_s), "baseline_tokens_per_s": round(baseline),
                  "ratio": round(tokens_per_s / baseline, 3), "goal": 0.85}
        if device == "cuda":
            result["mfu"] = round(tokens_per_s * flops_per_token(config, args.seq_len) / args.peak_flops, 4)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

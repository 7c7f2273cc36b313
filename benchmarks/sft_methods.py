"""SFT methods compared: trainable share at ChatGLM-6B's shape, and peak memory and held-out
loss when fine-tuning a pretrained `small` checkpoint with each method in the same run.

    python benchmarks/sft_methods.py [--base runs/smoke/pretrain/model] [--steps 60] [--batch 1] [--seq-len 128]

1. Trainable-parameter share of P-Tuning v2 (prefix 128) and LoRA (rank 8, all four block
   projections) at the `chatglm_6b` shape, counted on the meta device (no memory).
   Goal: under 1% each (ChatGLM-6B's P-Tuning v2 is about 0.5%).
2. Each method (full, ptuning, lora) fine-tunes the base on the shipped SFT sample data in
   its own fresh process, with the stage's own data preparation, model factory and the
   engine's optimizer: held-out loss before and after, and peak training memory (on CUDA
   the allocator's peak; on CPU the growth of peak RSS over the process's size before the
   model was loaded: weights + gradients + optimizer state + activations).
   Goal: P-Tuning v2 and LoRA peak memory clearly below full fine-tuning. The default batch
   (1 x 128 tokens) keeps activations small next to weights, gradients and optimizer state,
   the regime of fine-tuning a 6B model; with large batches activations dominate on a model
   this small and the methods converge (LoRA even adds its own activations).
3. For scale, the bytes of model state (bf16 weights, plus bf16 gradients and fp32 Adam
   master/moments for the trainable parameters) at the chatglm_6b shape per method, computed
   from the parameter counts (not measured).

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def trainable_share_6b() -> dict[str, tuple[int, int]]:
    import torch

    from glm.adapters import apply_lora, freeze_all_but, trainable_share
    from glm.config import preset
    from glm.model import GLMModel

    out = {}
    for method in ("ptuning", "lora"):
        with torch.device("meta"):
            model = GLMModel(preset("chatglm_6b", pre_seq_len=128 if method == "ptuning" else 0))
            if method == "lora":
                apply_lora(model, rank=8, alpha=16.0)
        freeze_all_but(model, ("prefix_encoder.",) if method == "ptuning" else ("lora_a", "lora_b"))
        trainable, total = trainable_share(model)
        out[method] = (trainable, total)
        print(f"chatglm_6b {method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)",
              flush=True)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    """One method in this (fresh) process; prints one JSON line."""
    import numpy as np
    import torch

    from stages.engine.config import EngineConfig, OptimConfig
    from stages.engine.data import ShardSource
    from stages.engine.loop import build_optimizer
    from stages.sft.config import MethodConfig
    from stages.sft.stage import build_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    train, val = ShardSource(args.data, "train"), ShardSource(args.data, "validation")
    before_model = _rss_bytes()
    torch.manual_seed(0)
    method = MethodConfig(kind=args.method, pre_seq_len=args.pre_seq_len, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0)
    model = build_model(args.base, method, {}).to(device)
    lr = {"full": 1e-4, "ptuning": 1e-2, "lora": 1e-3}[args.method]
    optimizer = build_optimizer(model, EngineConfig(optim=OptimConfig(lr=lr, weight_decay=0.0)))

    def batch(source, indices):
        return {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in source.rows(indices).items()}

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(**batch(val, np.arange(i, min(i + args.batch, val.size)))).loss.item()
                      for i in range(0, val.size, args.batch)]
        model.train()
        return float(np.mean(losses))

    loss_before = held_out_loss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for step in range(args.steps):
        indices = np.arange(step * args.batch, (step + 1) * args.batch) % train.size
        loss = model(**batch(train, indices)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            print(f"  {args.method} step {step + 1}/{args.steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes() - before_model
    return {"method": args.method, "loss_before": loss_before, "loss_after": held_out_loss(), "peak_bytes": peak,
            "peak_memory_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss_growth",
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "steps_per_s": args.steps / seconds}


def prepare_data(base: str, out: str, seq_len: int) -> str:
    from stages.sft.config import SFTConfig, SFTDataConfig, SFTSource
    from stages.sft.stage import prepare_data as prepare

    cfg = SFTConfig(output=out, base=base, data=SFTDataConfig(
        sources=[SFTSource(uri=str(REPO / "data/sample/sft/zh_oasst1.jsonl")),
                 SFTSource(uri=str(REPO / "data/sample/sft/en_dpo_demo_messages.jsonl"))],
        seq_len=seq_len, validation_fraction=0.1, output=f"{out}/data"))
    prepare(cfg)
    return cfg.data.output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(REPO / "runs/smoke/pretrain/model"),
                        help="pretrained inference checkpoint (default: make smoke's output)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pre-seq-len", type=int, default=128)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(worker(args)))
        return
    if not Path(args.base, "config.json").exists():
        sys.exit(f"error: no pretrained checkpoint at {args.base}: run `make smoke` first or pass --base DIR")

    shares = trainable_share_6b()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(args.base, tmp, args.seq_len)
        for method in ("full", "ptuning", "lora"):
            print(f"fine-tuning with {method} ({args.steps} steps of {args.batch} rows x {args.seq_len}) ...", flush=True)
            cmd = [sys.executable, __file__, "--method", method, "--data", data, "--base", args.base,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--pre-seq-len", str(args.pre_seq_len)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
            r = results[method]
            print(f"  {method}: held-out loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}, "
                  f"peak memory {r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_memory_kind']}), "
                  f"{r['trainable']:,} trainable", flush=True)
    full_peak = results["full"]["peak_bytes"]
    base_6b = shares["ptuning"][1] - shares["ptuning"][0]  # the model without its prefixes

    def state_bytes(trainable: int, total: int) -> int:
        return 2 * total + trainable * (2 + 12)  # bf16 weights; bf16 grads + fp32 master, m, v

    summary = {
        "trainable_share_ptuning_6b": shares["ptuning"][0] / shares["ptuning"][1],
        "trainable_share_lora_6b": shares["lora"][0] / shares["lora"][1],
        "state_gib_6b_computed": {"full": state_bytes(base_6b, base_6b) / 2**30,
                                  "ptuning": state_bytes(*shares["ptuning"]) / 2**30,
                                  "lora": state_bytes(*shares["lora"]) / 2**30},
        "peak_mem_ratio_ptuning": results["ptuning"]["peak_bytes"] / full_peak,
        "peak_mem_ratio_lora": results["lora"]["peak_bytes"] / full_peak,
        "peak_mem_bytes": {m: r["peak_bytes"] for m, r in results.items()},
        "peak_memory_kind": results["full"]["peak_memory_kind"],
        "baseline": "full fine-tuning in the same run",
        **{f"loss_before_{m}": r["loss_before"] for m, r in results.items()},
        **{f"loss_after_{m}": r["loss_after"] for m, r in results.items()},
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "pre_seq_len": args.pre_seq_len,
        "goal": {"trainable_share_6b": "< 0.01 each", "peak_mem_ratio": "clearly below 1 (ptuning, lora)"},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

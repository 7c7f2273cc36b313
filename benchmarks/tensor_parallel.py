"""Tensor parallelism of the model library (glm/parallel.py) against the dense model.

    python benchmarks/tensor_parallel.py [--tp 2] [--steps 20]

Starts `tp` processes (torchrun; gloo on CPU, NCCL on GPUs where there are enough) and, on
the same weights in fp32, compares:
- logits and loss of a TP model against the dense model for a 130B-style block (GeGLU, 1D
  RoPE, tied vocabulary) and a 6B-style block (GELU, 2D RoPE, separate output head);
- every parameter's gradient (the dense gradient's shard against the TP one);
- `steps` AdamW training steps of TP against dense on the same data and seed;
- the round trip dense -> shards -> dense of a state dict;
- one rank's parameter bytes against the whole model's.
Prints progress, then one JSON line with `tp`, `logits_max_abs_diff`, `grad_max_abs_diff`,
`train_loss_max_rel_diff`, `param_bytes_per_rank_ratio` and the goals. Training through the
engine and serving with TP are not covered yet (issue 18).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STYLES = {
    "130b_style": {"ffn_type": "geglu", "position_encoding": "rope_1d", "tie_word_embeddings": True},
    "6b_style": {"ffn_type": "gelu", "position_encoding": "rope_2d", "tie_word_embeddings": False},
}


def worker(args) -> dict:
    import torch
    import torch.distributed as dist

    from glm.config import preset
    from glm.model import GLMModel
    from glm.parallel import TPGroup, merge_state_dicts, shard_state_dict, tensor_parallel_model

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.tp
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    tp = TPGroup()
    result = {"tp": tp.size, "device": str(device), "styles": {}}
    for style, overrides in STYLES.items():
        torch.manual_seed(0)
        config = preset("tiny", hidden_size=args.hidden, num_heads=args.heads, num_layers=2, vocab_size=args.vocab,
                        **overrides)
        dense = GLMModel(config).to(device)  # the same seed: the same weights on every rank
        B, T = 2, args.seq
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
        pos = torch.arange(T, device=device).expand(B, T)
        block = torch.zeros_like(pos)
        prefix = (torch.arange(T, device=device) < T // 4).long().expand(B, T)
        labels = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
        labels[:, : T // 4] = -100
        batch = dict(input_ids=ids, position_ids=pos, block_position_ids=block, prefix_mask=prefix, labels=labels)

        out = dense(**batch)
        out.loss.backward()
        model = tensor_parallel_model(config, {k: v.detach().cpu() for k, v in dense.state_dict().items()}, tp,
                                      gather_logits=True).to(device)
        tp_out = model(**batch)
        tp_out.loss.backward()
        dense_grads = shard_state_dict({n: p.grad for n, p in dense.named_parameters()}, config, tp.rank, tp.size)
        grad_diff = max(float((p.grad - dense_grads[n]).abs().max()) for n, p in model.named_parameters())
        shards = [None] * tp.size
        dist.all_gather_object(shards, {k: v.cpu() for k, v in model.state_dict().items()})
        merged = merge_state_dicts(shards, config)
        round_trip = all(torch.equal(merged[k], v.cpu()) for k, v in dense.state_dict().items())
        rank_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())

        # training: the same steps on both
        dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
        tp_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        dense_opt.zero_grad()  # the gradients of the comparison above
        tp_opt.zero_grad()
        rel = []
        t_dense = t_tp = 0.0

        def train_step(net, opt, step_batch) -> tuple[float, float]:
            """(loss, seconds) of one AdamW step."""
            t = time.perf_counter()
            loss = net(**step_batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss), time.perf_counter() - t

        for step in range(args.steps):
            g = torch.Generator().manual_seed(100 + step)
            ids = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
            step_batch = {**batch, "input_ids": ids, "labels": torch.roll(ids, -1, 1)}
            d, seconds = train_step(dense, dense_opt, step_batch)
            t_dense += seconds
            p, seconds = train_step(model, tp_opt, step_batch)
            t_tp += seconds
            rel.append(abs(p - d) / abs(d))
        result["styles"][style] = {
            "logits_max_abs_diff": float((tp_out.logits - out.logits).abs().max()),
            "loss_abs_diff": abs(float(tp_out.loss) - float(out.loss)),
            "grad_max_abs_diff": grad_diff, "state_dict_round_trip": round_trip,
            "train_loss_max_rel_diff": max(rel) if rel else 0.0,
            "param_bytes_per_rank_ratio": rank_bytes / dense_bytes,
            "dense_step_s": t_dense / max(1, args.steps), "tp_step_s": t_tp / max(1, args.steps),
        }
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args)
        if result and int(os.environ.get("RANK", 0)) == 0:
            print("WORKER " + json.dumps(result), flush=True)
        return

    print(f"tensor parallelism {args.tp}: {args.tp} processes, {args.steps} training steps per block style", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp), "--master_port",
           str(_free_port()), __file__, "--worker"] + [a for a in sys.argv[1:] if a != "--worker"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the tensor-parallel workers failed (rc {proc.returncode})")
    worker_result = json.loads(line[len("WORKER "):])
    styles = worker_result["styles"]
    for name, s in styles.items():
        print(f"  {name}: logits diff {s['logits_max_abs_diff']:.2e}, grad diff {s['grad_max_abs_diff']:.2e}, "
              f"train loss rel diff {s['train_loss_max_rel_diff']:.2e}, bytes per rank {s['param_bytes_per_rank_ratio']:.3f}",
              flush=True)
    result = {
        "benchmark": "tensor_parallel", "tp": worker_result["tp"], "device": worker_result["device"],
        "logits_max_abs_diff": max(s["logits_max_abs_diff"] for s in styles.values()),
        "grad_max_abs_diff": max(s["grad_max_abs_diff"] for s in styles.values()),
        "train_loss_max_rel_diff": max(s["train_loss_max_rel_diff"] for s in styles.values()),
        "param_bytes_per_rank_ratio": max(s["param_bytes_per_rank_ratio"] for s in styles.values()),
        "state_dict_round_trip": all(s["state_dict_round_trip"] for s in styles.values()),
        "styles": styles, "seconds": round(time.perf_counter() - t, 1),
        "baseline": "the dense (TP=1) model with the same weights, in the same run",
        "serve_same_greedy": "not measured: TP serving is not built yet",
        "goal": {"logits_max_abs_diff": 1e-4, "train_loss_max_rel_diff": 1e-4, "param_bytes_per_rank_ratio": 0.6},
    }
    print(json.dumps(result))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

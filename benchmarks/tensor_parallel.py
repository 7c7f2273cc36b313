"""Tensor parallelism of the model library (glm/parallel.py) against the dense model.

    python benchmarks/tensor_parallel.py [--tp 2] [--steps 20]

Starts `tp` processes (torchrun; gloo on CPU, NCCL on GPUs where there are enough) and, on
the same weights in fp32, compares:
- logits and loss of a TP model against the dense model for a 130B-style block (GeGLU, 1D
  RoPE, tied vocabulary) and a 6B-style block (GELU, 2D RoPE, separate output head);
- every parameter's gradient (the dense gradient's shard against the TP one);
- `steps` AdamW training steps of TP against dense on the same data and seed, in a plain loop;
- the same through the training engine (stages/engine: DeepSpeed ZeRO-2 with the model-parallel
  unit, fit_in_process under torchrun): `steps` steps of a TP=`tp` x DP=1 run against a TP=1
  run of the same data (a synthetic data-stage output) and seed, per block style: the
  `train_loss_max_rel_diff` reported (the plain loop's figure with --no-engine);
- the round trip dense -> shards -> dense of a state dict;
- one rank's parameter bytes against the whole model's.
Then serving (unless --no-serve), on a local Ray with a tiny checkpoint (random weights,
seed 0; the tokenizer trained on the sample corpus):
- the same greedy completion requests, all sent at once, through a TP=1 and a TP=`tp` Serve
  replica: `serve_same_greedy` is the share of requests whose text is the same, and each
  replica's generated tokens/s (GPU workers, one GPU each, fp16, where there are `tp` GPUs;
  on CPU the figure shows the cost of the worker round trips on a tiny model, not a speed-up);
- the same requests through the engine in this process with TP workers: the round trip to the
  workers per forward call beyond what the workers spend (`serve_overhead_ms_per_call`), and
  that of a call carrying no work (`serve_empty_call_ms`: Ray's own latency on the machine).
Prints progress, then one JSON line with `tp`, `logits_max_abs_diff`, `grad_max_abs_diff`,
`train_loss_max_rel_diff` (and `train_source`: engine or loop), `param_bytes_per_rank_ratio`,
`serve_same_greedy` and the goals.
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

    from glm.model import GLMModel
    from glm.parallel import TPGroup, merge_state_dicts, shard_state_dict, tensor_parallel_model

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.tp
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    tp = TPGroup()
    result = {"tp": tp.size, "device": str(device), "styles": {}}
    for style in STYLES:
        torch.manual_seed(0)
        config = style_config(args, style)
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
            "loop_train_loss_max_rel_diff": max(rel) if rel else 0.0,
            "param_bytes_per_rank_ratio": rank_bytes / dense_bytes,
            "dense_step_s": t_dense / max(1, args.steps), "tp_step_s": t_tp / max(1, args.steps),
        }
    dist.destroy_process_group()
    return result


def style_config(args, style: str):
    from glm.config import preset

    return preset("tiny", hidden_size=args.hidden, num_heads=args.heads, num_layers=2, vocab_size=args.vocab,
                  **STYLES[style])


def write_training_data(root: Path, rows: int, seq: int, vocab: int) -> str:
    """A synthetic data-stage output (manifest + one Parquet shard of the sample schema): random
    tokens, next-token labels, a bidirectional prefix of a quarter of each row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from glm.schema import COLUMNS, IGNORE_INDEX

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = IGNORE_INDEX
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq))
    columns = {"input_ids": ids, "labels": labels, "position_ids": positions,
               "block_position_ids": np.zeros((rows, seq), np.int32), "segment_ids": np.ones((rows, seq), np.int32),
               "prefix_mask": (positions < seq // 4).astype(np.int32)}
    offsets = pa.array(np.arange(0, rows * seq + 1, seq, dtype=np.int32))
    table = pa.table({"index": pa.array(np.arange(rows, dtype=np.int64)),
                      **{c: pa.ListArray.from_arrays(offsets, pa.array(columns[c].reshape(-1))) for c in COLUMNS}})
    (root / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "train/part-0.parquet")
    manifest = {"splits": {"train": {"rows": rows, "shards": [{"file": "train/part-0.parquet"}]}},
                "schema": {"seq_len": seq}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def engine_worker(args) -> dict:
    """One torchrun process of an engine run per block style at tensor parallelism --engine-tp
    (WORLD_SIZE = that degree: one replica); rank 0 returns each style's losses."""
    import functools

    import torch

    from stages import engine
    from stages.engine import steplog
    from stages.engine.loop import run_uri
    from stages.pretrain.stage import build_model

    tp = args.engine_tp
    losses = {}
    for style in STYLES:
        spec = engine.TrainSpec(model_factory=functools.partial(build_model, style_config(args, style)),
                                data_uri=args.engine_data, step_fn=engine.lm_loss_step)
        cfg = engine.EngineConfig(
            run_name=f"{style}-tp{tp}", storage_path=args.engine_runs, num_workers=tp, tensor_parallel=tp,
            use_gpu=torch.cuda.device_count() >= tp, micro_batch_size=4, train_steps=args.steps, zero_stage=2,
            optim=engine.OptimConfig(lr=1e-3, warmup_steps=2), checkpoint_every=args.steps, log_every=args.steps,
            seed=0)
        engine.fit_in_process(spec, cfg)
        losses[style] = {r["step"]: r["loss"] for r in steplog.read(run_uri(cfg)) if "loss" in r}
    return losses


def engine_comparison(args) -> dict:
    """`steps` engine steps at TP=`tp` (one replica) against TP=1, same data and seed."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = write_training_data(Path(tmp) / "data", rows=4 * args.steps, seq=args.seq, vocab=args.vocab)
        runs = {}
        for tp in (args.tp, 1):
            t = time.perf_counter()
            runs[tp] = _torchrun(tp, ["--engine-worker", "--engine-tp", str(tp), "--engine-data", data,
                                      "--engine-runs", str(Path(tmp) / "runs")], "ENGINE ")
            print(f"  engine at TP={tp}: {args.steps} steps per block style in {time.perf_counter() - t:.1f}s",
                  flush=True)
    out = {}
    for style in STYLES:
        tp_losses, dense = ({int(step): loss for step, loss in runs[tp][style].items()} for tp in (args.tp, 1))
        assert sorted(tp_losses) == sorted(dense) == list(range(1, args.steps + 1)), (tp_losses, dense)
        out[style] = max(abs(tp_losses[s] - dense[s]) / abs(dense[s]) for s in dense)
        print(f"  {style}: engine TP={args.tp} vs TP=1 loss rel diff {out[style]:.2e} over {args.steps} steps "
              f"(TP=1 loss {dense[1]:.4f} -> {dense[args.steps]:.4f})", flush=True)
    return out


def _torchrun(nproc: int, extra: list[str], marker: str) -> dict:
    """Run this script's worker under torchrun with `nproc` processes; rank 0's marked JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), __file__] + [a for a in sys.argv[1:] if a != "--worker"] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker)), None)
    if proc.returncode or line is None:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the tensor-parallel workers failed (rc {proc.returncode}): {' '.join(extra[:3])}")
    return json.loads(line[len(marker):])


SERVE_PROMPTS = [
    "First Citizen:\n", "话说天下大势，", "The history of the Roman Empire", "def fibonacci(n):\n",
    "In the beginning", "天下之事，", "Once upon a time, in a land far away,", "The weather today is",
    "Hello", "1, 2, 3, 4,", "The quick brown fox", "床前明月光，", "To be, or not to be,", "import torch\n",
    "Dear Sir or Madam,", "北京是",
]


def _complete_all(url: str, prompts: list[str], max_tokens: int) -> tuple[list[str], int, float]:
    """Greedy completions of every prompt, all sent at once: (texts, generated tokens, seconds)."""
    import concurrent.futures as cf

    import requests

    def one(prompt: str) -> tuple[str, int]:
        r = requests.post(f"{url}/v1/completions", json={"model": "glm", "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0}, timeout=600)
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["text"], body["usage"]["completion_tokens"]

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(one, prompts))
    return [a[0] for a in answers], sum(a[1] for a in answers), time.perf_counter() - t


def serve_comparison(args) -> dict:
    """TP=1 against TP=`args.tp` Serve replicas of one tiny checkpoint (see the module doc)."""
    import itertools
    import tempfile
    import threading

    import ray
    import torch

    from glm.checkpoint import save_inference_checkpoint, verified_checkpoint
    from glm.config import padded_vocab_size, preset
    from glm.generation import GenerationConfig, SpanQuery
    from glm.model import GLMModel
    from glm.tokenizer import train_tokenizer
    from stages.cluster import ensure_ray
    from stages.serve import ServeConfig, deploy, shutdown
    from stages.serve.engine import DecodeEngine, wait_for
    from stages.serve.tensor_parallel import start_tensor_parallel

    on_gpu = torch.cuda.device_count() >= args.tp
    texts = []
    for path in sorted((REPO / "data/sample/pretrain").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in itertools.islice(f, 6)]
    tokenizer = train_tokenizer(texts, vocab_size=3000, character_coverage=0.995)
    prompts = (SERVE_PROMPTS * (1 + args.serve_requests // len(SERVE_PROMPTS)))[:args.serve_requests]
    result = {"serve_device": f"{args.tp} GPUs" if on_gpu else "cpu", "serve_preset": args.serve_preset,
              "serve_requests": len(prompts), "serve_max_tokens": args.serve_max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GLMModel(preset(args.serve_preset, vocab_size=padded_vocab_size(len(tokenizer)))).eval()
        checkpoint = save_inference_checkpoint(model, tokenizer, Path(tmp) / "model")
        del model
        ensure_ray(min_cpus=args.tp + 2)
        answers, speed = {}, {}
        for tp in (1, args.tp):
            config = ServeConfig(checkpoint=checkpoint, port=_free_port(), tensor_parallel=tp,
                                 num_gpus=1 if on_gpu else 0, dtype="float16" if on_gpu else "auto",
                                 max_batch_size=8, max_waiting=max(64, len(prompts)))
            t = time.perf_counter()
            url = deploy(config, timeout_s=300)
            print(f"  TP={tp} replica up in {time.perf_counter() - t:.1f}s", flush=True)
            try:
                _complete_all(url, prompts[:2], 4)  # warm-up
                answers[tp], tokens, seconds = _complete_all(url, prompts, args.serve_max_tokens)
            finally:
                shutdown()
            speed[f"tp{tp}"] = round(tokens / seconds, 1)
            print(f"  TP={tp}: {tokens} tokens in {seconds:.1f}s", flush=True)
        same = [a == b for a, b in zip(answers[1], answers[args.tp])]
        result["serve_same_greedy"] = sum(same) / len(same)
        result["serve_tokens_per_s"] = speed

        # the driver's round trip per forward call, beyond the workers' own time
        with verified_checkpoint(checkpoint) as (local, model_config, _, _):
            tp_model = start_tensor_parallel(local, model_config, args.tp)
        engine = DecodeEngine(tp_model, tokenizer, max_batch_size=8)
        try:
            def one(prompt: str) -> None:
                ids = tokenizer.encode(prompt) + [tokenizer.special.gmask]
                wait_for(engine, SpanQuery(ids, len(ids) - 1, True), GenerationConfig(args.serve_max_tokens))

            threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            busy = ray.get(tp_model.workers[0].busy_seconds.remote())
            calls, seconds = tp_model.stats["calls"], tp_model.stats["seconds"]
            t = time.perf_counter()
            for _ in range(50):  # the same round trip carrying no work: Ray's own call latency here
                tp_model.flush()
            result["serve_empty_call_ms"] = round(1000 * (time.perf_counter() - t) / 50, 2)
        finally:
            engine.close()
            tp_model.close()
        result["serve_overhead_ms_per_call"] = round(1000 * (seconds - busy) / calls, 2)
        result["serve_worker_ms_per_call"] = round(1000 * busy / calls, 2)
        print(f"  driver: {calls} forward calls, {result['serve_worker_ms_per_call']} ms in the workers and "
              f"{result['serve_overhead_ms_per_call']} ms more per call; a call carrying no work "
              f"{result['serve_empty_call_ms']} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--no-serve", action="store_true", help="skip the serving comparison")
    parser.add_argument("--no-engine", action="store_true",
                        help="skip the engine's training comparison (train_loss_max_rel_diff from the plain loop)")
    parser.add_argument("--serve-preset", default="tiny", help="model preset of the serving comparison")
    parser.add_argument("--serve-requests", type=int, default=16)
    parser.add_argument("--serve-max-tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--engine-data", help=argparse.SUPPRESS)
    parser.add_argument("--engine-runs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.engine_worker:
        result = worker(args) if args.worker else engine_worker(args)
        if result and int(os.environ.get("RANK", 0)) == 0:
            print(("WORKER " if args.worker else "ENGINE ") + json.dumps(result), flush=True)
        return

    print(f"tensor parallelism {args.tp}: {args.tp} processes, {args.steps} training steps per block style", flush=True)
    t = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine skews the timings: recorded
    worker_result = _torchrun(args.tp, ["--worker"], "WORKER ")
    styles = worker_result["styles"]
    for name, s in styles.items():
        print(f"  {name}: logits diff {s['logits_max_abs_diff']:.2e}, grad diff {s['grad_max_abs_diff']:.2e}, "
              f"plain-loop train loss rel diff {s['loop_train_loss_max_rel_diff']:.2e}, "
              f"bytes per rank {s['param_bytes_per_rank_ratio']:.3f}", flush=True)
    if args.no_engine:
        train_diff, train_source = max(s["loop_train_loss_max_rel_diff"] for s in styles.values()), "loop"
    else:
        print(f"training engine: TP={args.tp} x DP=1 against TP=1, {args.steps} steps per block style", flush=True)
        engine_diffs = engine_comparison(args)
        for name, diff in engine_diffs.items():
            styles[name]["engine_train_loss_max_rel_diff"] = diff
        train_diff, train_source = max(engine_diffs.values()), "engine"
    result = {
        "benchmark": "tensor_parallel", "tp": worker_result["tp"], "device": worker_result["device"],
        "logits_max_abs_diff": max(s["logits_max_abs_diff"] for s in styles.values()),
        "grad_max_abs_diff": max(s["grad_max_abs_diff"] for s in styles.values()),
        "train_loss_max_rel_diff": train_diff,
        "train_source": (f"stages/engine, DeepSpeed ZeRO-2, TP={args.tp} x DP=1 vs TP=1" if train_source == "engine"
                         else "a plain AdamW loop (--no-engine)"),
        "param_bytes_per_rank_ratio": max(s["param_bytes_per_rank_ratio"] for s in styles.values()),
        "state_dict_round_trip": all(s["state_dict_round_trip"] for s in styles.values()),
        "styles": styles, "seconds": round(time.perf_counter() - t, 1),
        "baseline": "the dense (TP=1) model with the same weights, in the same run",
        "goal": {"logits_max_abs_diff": 1e-4, "train_loss_max_rel_diff": 1e-4, "param_bytes_per_rank_ratio": 0.6,
                 "serve_same_greedy": 1.0},
    }
    if args.no_serve:
        result["serve_same_greedy"] = "not measured (--no-serve)"
    else:
        print(f"serving: TP=1 and TP={args.tp} Serve replicas, {args.serve_requests} greedy requests each", flush=True)
        result.update(serve_comparison(args))
    result["seconds"] = round(time.perf_counter() - t, 1)
    result["load_avg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

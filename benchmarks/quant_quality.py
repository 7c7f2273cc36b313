"""Quality and weight memory of INT8 / INT4 weight-only quantization against the original model.

    python benchmarks/quant_quality.py [--checkpoint DIR] [--text FILE] [--max-tokens 16384]

The model: --checkpoint, else runs/smoke/pretrain/model (from `make smoke`) if it exists, else a `small`
GLM trained here for --train-steps on the sample corpus (all but the last quarter of each
file's documents; the default --text is read from the ends of the same files). Each
quantized model is produced by the stage's streaming conversion (`quantize_checkpoint`), loaded
back and scored with the stage's perplexity (`stages.quantize.quality`): [gMASK] windows of
--window tokens, the first quarter context. Modes: INT8 per row, INT4 per row, INT4 per group
of --group-size columns.

Prints progress, then one JSON line: `fp_ppl` (the baseline, same run), each mode's
perplexity and ratio to FP, `int8_ppl_ratio`, `int4_ppl_ratio` (the best INT4 mode),
`int8_memory_ratio`, `int4_memory_ratio` (linear-weight bytes, integers + scales, over fp16
bytes) and the goals (INT8 <= 1.01, INT4 <= 1.10 on the small CPU model, INT4 memory <= 0.30).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TEXT = str(REPO / "data" / "sample" / "pretrain" / "*.jsonl")
GOALS = {"int8_ppl_ratio": 1.01, "int4_ppl_ratio": 1.10, "int4_memory_ratio": 0.30}


def train_small(out: Path, steps: int) -> str:
    """Train a `small` GLM on the sample corpus (minus each file's last quarter) and save it."""
    import torch

    from glm.checkpoint import save_inference_checkpoint
    from glm.config import padded_vocab_size, preset
    from glm.model import GLMModel
    from glm.tokenizer import train_tokenizer
    from stages.quantize.quality import gmask_batches, read_documents

    files = read_documents(SAMPLE_TEXT)
    train_docs = [d for docs in files for d in docs[: max(1, len(docs) * 3 // 4)]]
    print(f"training a `small` model: tokenizer on {len(train_docs)} documents ...", flush=True)
    tokenizer = train_tokenizer(train_docs, vocab_size=8000, character_coverage=0.9995)
    windows = [ids[i:i + 256] for ids in tokenizer.encode_batch(train_docs) for i in range(0, len(ids), 256)]
    windows = [w for w in windows if len(w) >= 64]
    torch.manual_seed(0)
    model = GLMModel(preset("small", vocab_size=padded_vocab_size(len(tokenizer)))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0)).tolist()
    batches = itertools.cycle(gmask_batches([windows[i] for i in order], tokenizer, True, 8))
    start = time.perf_counter()
    for step in range(steps):
        inputs, _ = next(batches)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    save_inference_checkpoint(model.eval(), tokenizer, out, metadata={"stage": "quant_quality benchmark",
                                                                      "train_steps": steps})
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="full-precision inference checkpoint (default: see above)")
    parser.add_argument("--text", default=SAMPLE_TEXT, help="held-out JSONL (`text` field) or plain text")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=300, help="when a model must be trained here")
    args = parser.parse_args()

    import torch

    from glm.checkpoint import load_inference_checkpoint
    from glm.quantization import QuantSpec, quantize_checkpoint
    from stages.quantize.quality import heldout_windows, perplexity

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="quant_quality_"))
    try:
        checkpoint, source = args.checkpoint, args.checkpoint
        if checkpoint is None and (REPO / "runs" / "smoke" / "pretrain" / "model" / "config.json").exists():
            checkpoint = source = str(REPO / "runs" / "smoke" / "pretrain" / "model")
        if checkpoint is None:
            checkpoint = train_small(work / "fp", args.train_steps)
            source = f"small trained here for {args.train_steps} steps"
        print(f"checkpoint: {source}", flush=True)
        model, tokenizer = load_inference_checkpoint(checkpoint)
        windows = heldout_windows(args.text, tokenizer, args.max_tokens, min(args.window, model.config.max_seq_len - 1))
        tokens = sum(len(w) for w in windows)
        print(f"text: {len(windows)} windows, {tokens} tokens from {args.text}", flush=True)

        def score(label: str, m) -> float:
            start = time.perf_counter()
            ppl = perplexity(m, windows, tokenizer)
            print(f"  {label}: perplexity {ppl:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
            return ppl

        fp_ppl = score("fp", model)
        del model
        modes = {"int8": QuantSpec(8), "int4_row": QuantSpec(4), f"int4_group{args.group_size}": QuantSpec(4, args.group_size)}
        ppl, memory = {}, {}
        for label, spec in modes.items():
            report = quantize_checkpoint(checkpoint, work / label, spec, progress=lambda msg: None)
            memory[label] = report["memory_ratio"]
            ppl[label] = score(f"{label} ({memory[label]:.1%} of fp16 linear-weight bytes)",
                               load_inference_checkpoint(work / label)[0])
        int4_modes = [k for k in modes if k.startswith("int4")]
        best = min(int4_modes, key=lambda k: ppl[k])
        result = {
            "benchmark": "quant_quality", "checkpoint": source, "text": args.text, "tokens": tokens,
            "fp_ppl": round(fp_ppl, 4),
            **{f"{k}_ppl": round(v, 4) for k, v in ppl.items()},
            **{f"{k}_ppl_ratio": round(v / fp_ppl, 5) for k, v in ppl.items() if k != "int8"},
            "int8_ppl_ratio": round(ppl["int8"] / fp_ppl, 5),
            "int4_ppl_ratio": round(ppl[best] / fp_ppl, 5), "int4_best_mode": best,
            "int8_memory_ratio": round(memory["int8"], 4), "int4_memory_ratio": round(memory[best], 4),
            **{f"{k}_memory_ratio": round(memory[k], 4) for k in int4_modes},
            "goal": GOALS,
        }
        result["goal_met"] = {k: result[k] <= v for k, v in GOALS.items()}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Multiple-choice scoring speed: items per second batched against one item at a time (goal >= 3x).

Both measurements use the eval stage's scorer (stages/eval/scoring.py: each item's context is
encoded once, its choices scored as rows sharing the cached context) on the same items in the
same run; the baseline passes one item per forward. For reference it also times the naive
scorer, one choice (with its own copy of the context) at a time. Items: the shipped OpenBookQA sample
(4 answer texts per question). Model: an inference checkpoint (--checkpoint) or, by default,
the `small` preset with random weights and a tokenizer trained on data/sample/pretrain.

    python benchmarks/eval_speed.py [--items 64] [--batch-size 16] [--checkpoint runs/smoke/sft/model]

The last output line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_model(checkpoint: str | None):
    import itertools

    import torch

    from glm.config import padded_vocab_size, preset
    from glm.model import GLMModel
    from glm.tokenizer import train_tokenizer

    if checkpoint:
        from glm.checkpoint import load_inference_checkpoint

        return load_inference_checkpoint(checkpoint)
    texts = []
    for path in sorted((REPO / "data/sample/pretrain").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in itertools.islice(f, 20)]
    tokenizer = train_tokenizer(texts, vocab_size=4000, character_coverage=0.995)
    torch.manual_seed(0)
    return GLMModel(preset("small", vocab_size=padded_vocab_size(len(tokenizer)))).eval(), tokenizer


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint", help="an inference checkpoint (default: random `small` model)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each mode; the fastest counts")
    args = parser.parse_args()

    import torch

    from glm.config import load_yaml
    from stages.eval.config import TaskConfig
    from stages.eval.scoring import score_continuations
    from stages.eval.tasks import load_task_data

    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.checkpoint)
    task = load_yaml(TaskConfig, REPO / "stages/eval/tasks/en/openbookqa.yaml")
    items = load_task_data(task, max_items=args.items).items
    requests = [(tokenizer.encode(it.inputs), [tokenizer.encode(c) for c in it.choices]) for it in items]
    special, max_len = tokenizer.special, min(task.max_length, model.config.max_seq_len)
    print(f"[eval_speed] {len(items)} items, {sum(len(c) for _, c in requests)} choices, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.threads} threads", flush=True)

    def score(batch_size: int, reqs=requests):
        return score_continuations(model, special, reqs, mask_token=special.mask, max_len=max_len, batch_size=batch_size)

    score(args.batch_size, requests[:args.batch_size])  # warm-up (allocator, kernels)
    score(1, requests[:2])
    # Alternating runs, best of each: on a shared machine other load slows single runs unevenly.
    # The naive scorer for reference: one sequence per choice (context encoded again for each).
    per_choice = [(p, [c]) for p, conts in requests for c in conts]
    batched_times, single_times, naive_times = [], [], []
    for repeat in range(args.repeats):
        seconds, batched = timed(lambda: score(args.batch_size))
        batched_times.append(seconds)
        seconds, single = timed(lambda: score(1))
        single_times.append(seconds)
        naive_times.append(timed(lambda: score(1, per_choice))[0])
        print(f"[eval_speed] run {repeat + 1}/{args.repeats}: batched ({args.batch_size} items per forward) "
              f"{batched_times[-1]:.2f} s, one item at a time {single_times[-1]:.2f} s, "
              f"one choice at a time {naive_times[-1]:.2f} s", flush=True)
    batched_s, single_s, naive_s = min(batched_times), min(single_times), min(naive_times)
    diff = max(abs(a.logprob - b.logprob) for x, y in zip(batched, single) for a, b in zip(x, y))
    result = {
        "benchmark": "eval_speed",
        "model": args.checkpoint or "small (random weights)",
        "items": len(items),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "device": str(next(model.parameters()).device),
        "items_per_s": round(len(items) / batched_s, 2),
        "baseline_items_per_s": round(len(items) / single_s, 2),
        "ratio": round(single_s / batched_s, 3),
        "goal": 3.0,
        "one_choice_at_a_time_items_per_s": round(len(items) / naive_s, 2),
        "max_logprob_diff": float(f"{diff:.3g}"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Does the recipe learn? The smoke recipe (GLM objective, `small` preset) trained for a longer
budget in one process, scored on held-out text against unigram and bigram count models.

    python benchmarks/learning.py                      # 30 minutes on ../shared/data, then the JSON line
    python benchmarks/learning.py --minutes 3 --train 'data/sample/pretrain/*.jsonl'
    python benchmarks/learning.py --checkpoint runs/smoke/pretrain/model   # score a trained model only

Held-out text: the last rows of every ../shared/data/pretrain file (the tail `--heldout-rows`
of each; the shipped sample and `--train` from the shared folder take rows from the start only).
Each language's held-out text is cut into windows of `--window` tokens by the quantize gate's
`heldout_windows` and scored with its `perplexity`: [gMASK] samples, the first quarter of each
window is context and the rest predicted. The count models (`stages.data.baselines`) are fitted
on the training text's tokens and scored on the same predicted tokens.

Training (not in --checkpoint mode): the data stage's blank-infilling rows ([MASK] 30% / [gMASK]
70%; MIP rows are left out here) cut from the training documents, AdamW with warm-up and cosine
decay, one process. The curve (held-out perplexity against tokens seen) is printed, written
as a PNG and logged to MLflow with --tracking; the last line is JSON with `ppl`, `unigram_ppl`,
`bigram_ppl` per language, their ratios and the goals.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from glm.config import preset  # noqa: E402
from glm.config import padded_vocab_size  # noqa: E402
from stages.data.baselines import CountModels, window_pairs  # noqa: E402
from stages.quantize.quality import heldout_windows, perplexity  # noqa: E402

LANGS = ("en", "zh")
GOALS = {"ppl_over_unigram": {"en": 0.45, "zh": 0.65}, "beats_bigram": True}  # issue 31


def _default_shared() -> str:
    root = Path(__file__).resolve().parent.parent
    for candidate in (root.parent / "shared" / "data", root.parent.parent / "shared" / "data"):
        if candidate.is_dir():
            return str(candidate)
    return str(root.parent / "shared" / "data")


def _read_rows(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def heldout_files(shared: str, tail_rows: float, out_dir: str) -> dict[str, str]:
    """Write the tail of each shared pretrain file to out_dir; {lang: glob of its held-out files}."""
    for path in sorted(glob.glob(os.path.join(shared, "pretrain", "*.jsonl"))):
        rows = _read_rows(path)
        n = max(2, int(len(rows) * tail_rows)) if tail_rows < 1 else int(tail_rows)
        with open(os.path.join(out_dir, os.path.basename(path)), "w", encoding="utf-8") as f:
            for text in rows[-n:]:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return {lang: os.path.join(out_dir, f"{lang}_*.jsonl") for lang in LANGS}


def training_docs(pattern: str, shared: str, tail_rows: float) -> dict[str, list[str]]:
    """Documents per language of the training files; files of the shared folder lose their tail."""
    docs: dict[str, list[str]] = {lang: [] for lang in LANGS}
    for path in sorted(glob.glob(pattern)):
        rows = _read_rows(path)
        if os.path.realpath(path).startswith(os.path.realpath(shared)):
            n = max(2, int(len(rows) * tail_rows)) if tail_rows < 1 else int(tail_rows)
            rows = rows[:-n]
        lang = os.path.basename(path)[:2]
        docs[lang if lang in docs else "en"].extend(rows)
    return docs


def count_models(tokenizer, docs: dict[str, list[str]]) -> CountModels:
    models = CountModels(len(tokenizer))
    for lang in LANGS:
        for ids in tokenizer.encode_batch(docs[lang]):
            models.add_sequence(ids)
    return models


def score(model, tokenizer, models: CountModels, heldout: dict[str, list[list[int]]]) -> dict[str, dict]:
    out = {}
    for lang, windows in heldout.items():
        base = models.perplexities(*window_pairs(windows))
        ppl = perplexity(model, windows, tokenizer) if model is not None else float("nan")
        out[lang] = {"ppl": round(ppl, 3), "unigram_ppl": round(base["unigram_ppl"], 3),
                     "bigram_ppl": round(base["bigram_ppl"], 3), "tokens": base["tokens"],
                     "ppl_over_unigram": round(ppl / base["unigram_ppl"], 4),
                     "ppl_over_bigram": round(ppl / base["bigram_ppl"], 4)}
    return out


def build_rows(tokenizer, docs: dict[str, list[str]], seq_len: int, seed: int):
    """Blank-infilling rows of the data stage's builder from one stream of shuffled documents."""
    from stages.data.blank_infilling import BlankInfillingBuilder
    from stages.data.config import ObjectiveConfig

    all_docs = [d for lang in LANGS for d in docs[lang]]
    random.Random(seed).shuffle(all_docs)
    stream: list[int] = []
    for ids in tokenizer.encode_batch(all_docs):
        stream += ids + [tokenizer.special.eos]
    objective = ObjectiveConfig(seq_len=seq_len, mask_window=min(64, seq_len), position_encoding="rope_2d")
    built = BlankInfillingBuilder(objective, tokenizer.special, seed).build_stream(stream, "train", 0)
    rows = {k: torch.tensor([b.row[k] for b in built], dtype=torch.long) for k in built[0].row}
    return rows, len(stream)


def train(args, tokenizer, docs, heldout, models, log) -> tuple[torch.nn.Module, list[dict]]:
    from glm.model import GLMModel

    torch.manual_seed(args.seed)
    rows, stream_tokens = build_rows(tokenizer, docs, args.seq_len, args.seed)
    n = rows["input_ids"].shape[0]
    log(f"rows: {n:,} of {args.seq_len} tokens from {stream_tokens:,} training tokens")
    overrides = {"vocab_size": padded_vocab_size(len(tokenizer)), "embedding_grad_shrink": args.egs,
                 "max_seq_len": max(512, args.seq_len)}
    for kv in args.model:
        k, v = kv.split("=")
        overrides[k] = type(getattr(preset(args.preset), k))(v) if getattr(preset(args.preset), k) is not None else int(v)
    model = GLMModel(preset(args.preset, **overrides))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    budget = float("inf") if args.steps else args.minutes * 60  # --steps: a fixed schedule, no time limit
    step_limit = args.steps or 10**9
    curve: list[dict] = []
    t0, seen, step, next_eval = time.time(), 0, 0, 0.0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    speed, warm_end = None, 0.0
    while True:
        elapsed = time.time() - t0
        if elapsed >= next_eval or step >= step_limit or elapsed >= budget:
            model.eval()
            s = score(model, tokenizer, models, heldout)
            model.train()
            curve.append({"step": step, "tokens": seen, "seconds": round(time.time() - t0, 1),
                          **{f"{lang}_ppl": s[lang]["ppl"] for lang in s},
                          **{f"{lang}_ratio": s[lang]["ppl_over_unigram"] for lang in s}})
            log(f"step {step} tokens {seen:,} {time.time() - t0:.0f}s " +
                "  ".join(f"{lang} ppl {s[lang]['ppl']:.1f} ({s[lang]['ppl_over_unigram']:.3f}x unigram, "
                          f"{s[lang]['ppl_over_bigram']:.3f}x bigram)" for lang in s))
            next_eval = time.time() - t0 + args.eval_every
            if step >= step_limit or elapsed >= budget:
                return model, curve
        if speed is None and step == 20:
            speed = step / (time.time() - t0)
            if not args.steps:
                log(f"{speed:.2f} steps/s at the start; the schedule follows the wall clock")
        warm = args.warmup
        if args.steps:  # cosine over the fixed number of steps
            progress = (step - warm) / max(1, args.steps - warm)
        else:  # cosine over the time left after the warm-up: the whole budget is used, whatever the speed
            warm_end = warm_end if step > warm else elapsed
            progress = (elapsed - warm_end) / max(1e-9, budget - warm_end)
        f = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in opt.param_groups:
            g["lr"] = args.lr * f
        idx = order[(step * args.batch + torch.arange(args.batch)) % n]
        batch = {k: v[idx] for k, v in rows.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += int((batch["segment_ids"] > 0).sum())
        step += 1


def write_curve(curve: list[dict], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for lang, style in zip(LANGS, ("-", "--")):
        ax.plot([c["tokens"] for c in curve], [c[f"{lang}_ppl"] for c in curve], style, label=f"GLM {lang}")
        for kind, color in (("unigram_ppl", "grey"), ("bigram_ppl", "black")):
            ax.axhline(summary[lang][kind], color=color, linestyle=style, linewidth=0.8,
                       label=f"{kind.split('_')[0]} {lang}")
    ax.set(xlabel="training tokens seen", ylabel="held-out perplexity", yscale="log",
           title="held-out perplexity ([gMASK] windows) vs count models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (wall clock)")
    parser.add_argument("--steps", type=int, default=0, help="fixed number of steps instead (0 = from --minutes)")
    parser.add_argument("--shared", default=_default_shared(), help="the shared data folder (../shared/data)")
    parser.add_argument("--train", default="", help="training files (default: the shared pretrain files)")
    parser.add_argument("--checkpoint", default="", help="only score this inference checkpoint (no training)")
    parser.add_argument("--heldout-rows", type=float, default=0.05,
                        help="held-out tail of each shared pretrain file: a fraction (< 1) or a row count")
    parser.add_argument("--heldout-tokens", type=int, default=16384, help="held-out tokens per language")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--coverage", type=float, default=0.99, help="tokenizer character coverage")
    parser.add_argument("--tokenizer-chars", type=int, default=8_000_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (the smoke recipe)")
    parser.add_argument("--warmup", type=int, default=60, help="warm-up steps (the smoke recipe)")
    parser.add_argument("--egs", type=float, default=1.0, help="embedding gradient shrink alpha (1 = off)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model", nargs="*", default=[], help="preset overrides, e.g. num_layers=2")
    parser.add_argument("--eval-every", type=float, default=60.0, help="seconds between held-out scores")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--png", default="runs/benchmarks/learning_curve.png")
    parser.add_argument("--tracking", action="store_true", help="log params, curve and PNG to MLflow")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[learning {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        heldout_uris = heldout_files(args.shared, args.heldout_rows, tmp)
        if args.checkpoint:
            from glm.checkpoint import load_inference_checkpoint

            model, tokenizer = load_inference_checkpoint(args.checkpoint)
            model.eval()
            docs = training_docs(args.train or "data/sample/pretrain/*.jsonl", args.shared, args.heldout_rows)
        else:
            from glm.tokenizer import train_tokenizer

            docs = training_docs(args.train or os.path.join(args.shared, "pretrain", "*.jsonl"),
                                 args.shared, args.heldout_rows)
            budget, texts = args.tokenizer_chars, []
            for lang in LANGS:  # a character budget per language, documents in file order
                used = 0
                for d in docs[lang]:
                    if used >= budget // 2:
                        break
                    texts.append(d)
                    used += len(d)
            tokenizer = train_tokenizer(texts, args.vocab, character_coverage=args.coverage)
            log(f"tokenizer: {len(tokenizer)} pieces; training text {sum(map(len, docs['en'])):,} en / "
                f"{sum(map(len, docs['zh'])):,} zh characters")
        models = count_models(tokenizer, docs)
        heldout = {lang: heldout_windows(uri, tokenizer, args.heldout_tokens, args.window)
                   for lang, uri in heldout_uris.items()}
        curve: list[dict] = []
        if not args.checkpoint:
            model, curve = train(args, tokenizer, docs, heldout, models, log)
        model.eval()
        result = score(model, tokenizer, models, heldout)
    summary = {
        "benchmark": "learning", "checkpoint": args.checkpoint or None,
        "train": args.train or ("data/sample/pretrain/*.jsonl" if args.checkpoint else f"{args.shared}/pretrain/*.jsonl (tails held out)"),
        "minutes": None if args.checkpoint or args.steps else args.minutes,
        "recipe": None if args.checkpoint else {"preset": args.preset, "model": args.model, "vocab": args.vocab,
                                                "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
                                                "egs": args.egs},
        "steps": curve[-1]["step"] if curve else None, "tokens_seen": curve[-1]["tokens"] if curve else None,
        **result,
        "goals": GOALS,
        "goal_met": {"ppl_over_unigram": all(result[lang]["ppl_over_unigram"] <= GOALS["ppl_over_unigram"][lang]
                                             for lang in LANGS),
                     "beats_bigram": all(result[lang]["ppl"] < result[lang]["bigram_ppl"] for lang in LANGS)},
        "seconds": round(time.time() - t_start, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if curve:
        print(json.dumps({"curve": curve}))
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        write_curve(curve, result, args.png)
        log(f"curve written to {args.png}")
        if args.tracking:
            import mlflow

            from stages.tracking import default_tracking_uri

            mlflow.set_tracking_uri(default_tracking_uri())
            mlflow.set_experiment("glm-benchmarks")
            with mlflow.start_run(run_name="learning"):
                mlflow.log_params(summary["recipe"])
                for c in curve:
                    mlflow.log_metrics({k: v for k, v in c.items() if k not in ("step", "seconds")}, step=c["tokens"])
                mlflow.log_artifact(args.png)
                mlflow.log_dict(summary, "learning.json")
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Local smoke run: the `small` GLM trained briefly on the shipped sample text, on CPU.

    python -m pipelines.smoke --config pipelines/configs/smoke.yaml

Trains a SentencePiece tokenizer, lays the corpus out as [gMASK] samples (GLM_SPEC.md
section 1), trains a few hundred steps printing the falling loss, generates continuations
of a few prompts and writes an inference checkpoint. This is the foundation's stand-in for
the full pipeline (data -> pretrain -> ... -> serve), which replaces it stage by stage.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glm.checkpoint import save_inference_checkpoint
from glm.config import ModelSpec, load_yaml, padded_vocab_size
from glm.generation import GenerationConfig, fill_blanks
from glm.model import GLMModel, count_parameters
from glm.schema import COLUMNS, layout_gmask, pack_samples
from glm.tokenizer import GLMTokenizer, train_tokenizer


@dataclass
class SmokeConfig:
    corpus: str = "data/sample/pretrain/*.jsonl"
    """Glob of JSONL files with one document per line."""
    text_field: str = "text"
    """Field of each JSON row holding the document."""
    vocab_size: int = 8000
    """Tokenizer size (the model's vocab is this padded to a multiple of 64)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Model preset and overrides."""
    seq_len: int = 128
    """Tokens per training row."""
    min_gmask_ratio: float = 0.2
    """Shortest masked suffix, as a share of the window ([gMASK] suffix ratio ~ U(this, 1))."""
    batch_size: int = 8
    steps: int = 400
    lr: float = 6e-4
    """Peak learning rate (post-LN DeepNorm diverges back to unigram loss at 3e-3 here)."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    log_every: int = 20
    seed: int = 1234
    prompts: list[str] = field(default_factory=lambda: ["First Citizen:\n", "话说天下大势"])
    """Texts to continue with the trained model ([gMASK] appended)."""
    max_new_tokens: int = 40
    output_dir: str = "runs/smoke"
    """Where the tokenizer and the inference checkpoint go."""


def read_documents(pattern: str, text_field: str) -> list[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"corpus glob {pattern!r} matches no file")
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"  skipping {path}:{n}: not JSON with a {text_field!r} field", file=sys.stderr)
                    continue
                if isinstance(text, str) and text.strip():
                    docs.append(text)
    return docs


def build_rows(token_stream: list[int], tokenizer: GLMTokenizer, cfg: SmokeConfig, use_2d: bool) -> dict[str, torch.Tensor]:
    """Cut the stream into windows; each becomes a [gMASK] sample with an index-seeded suffix."""
    window = cfg.seq_len - 1  # layout_gmask adds [gMASK]
    rows = {c: [] for c in COLUMNS}
    for index, start in enumerate(range(0, len(token_stream) - window, window)):
        tokens = token_stream[start:start + window]
        rng = random.Random(random.Random(cfg.seed * 1_000_003 + index).randint(0, 2**32 - 1))
        masked = max(1, int(len(tokens) * rng.uniform(cfg.min_gmask_ratio, 1.0)))
        sample = layout_gmask(tokens, len(tokens) - masked, tokenizer.special, use_2d=use_2d)
        for c, values in pack_samples([sample], cfg.seq_len, tokenizer.special.pad).items():
            rows[c].append(values)
    return {c: torch.tensor(v, dtype=torch.long) for c, v in rows.items()}


def run(cfg: SmokeConfig) -> Path:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    docs = read_documents(cfg.corpus, cfg.text_field)
    print(f"[1/4] corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters from {cfg.corpus}")
    tokenizer = train_tokenizer(docs, cfg.vocab_size)
    tokenizer.save(out / GLMTokenizer.MODEL_FILE)
    stream: list[int] = []
    for ids in tokenizer.encode_batch(docs):
        stream += ids + [tokenizer.special.eos]
    print(f"[2/4] tokenizer: {len(tokenizer)} pieces trained in {time.time() - t0:.0f}s; corpus = {len(stream):,} tokens")

    config = cfg.model.build(vocab_size=padded_vocab_size(len(tokenizer)), max_seq_len=max(cfg.seq_len, 512))
    model = GLMModel(config)
    rows = build_rows(stream, tokenizer, cfg, config.uses_2d_positions)
    n_rows = rows["input_ids"].shape[0]
    print(f"[3/4] training {cfg.model.preset!r} ({count_parameters(config).total / 1e6:.1f}M parameters) on "
          f"{n_rows} [gMASK] rows of {cfg.seq_len} tokens, {cfg.steps} steps of {cfg.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                                 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))))
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    running, t_train = [], time.time()
    for step in range(cfg.steps):
        idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % n_rows]
        batch = {c: v[idx] for c, v in rows.items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step == 0:
            tokens_per_s = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - t_train)
            print(f"  step {step + 1:4d}/{cfg.steps}  loss {sum(running) / len(running):.3f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}  {tokens_per_s:,.0f} tok/s", flush=True)
            running = []

    model.eval()
    print("[4/4] continuations (greedy, no-repeat 3):")
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, no_repeat_ngram_size=3)
    for prompt, result in zip(cfg.prompts, fill_blanks(model, tokenizer, cfg.prompts, gen)):
        print(f"  {prompt!r} -> {tokenizer.decode(result.spans[0])!r}")
    path = out / "model"
    save_inference_checkpoint(model, tokenizer, path, metadata={"stage": "smoke", "steps": cfg.steps})
    print(f"done in {time.time() - t0:.0f}s; inference checkpoint: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pipelines/configs/smoke.yaml", help="YAML file of SmokeConfig fields")
    args = parser.parse_args(argv)
    run(load_yaml(SmokeConfig, args.config))


if __name__ == "__main__":
    main()

"""Perplexity on held-out text, the measure of the quantize stage's quality gate.

Text is tokenized and cut into windows; each window is scored as a [gMASK] sample (the
layout GLM is pretrained on, `glm.schema.layout_gmask`): its first quarter is bidirectional
Part A context and the rest is predicted token by token as Part B. Perplexity is
exp(total negative log-likelihood / predicted tokens) over all windows.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Iterator

import torch

from glm.schema import layout_gmask, pack_samples
from glm.tokenizer import GLMTokenizer
from stages import storage


def read_documents(uri: str) -> list[list[str]]:
    """The documents of each file that `uri` names: JSONL (`.jsonl` / `.json`, one object with a
    `text` field per line) or plain text (one document per file)."""
    fs, paths = storage.expand(uri)
    per_file = []
    for path in paths:
        raw = storage.read_bytes(fs, path).decode("utf-8")
        if posixpath.splitext(path)[1] not in (".jsonl", ".json"):
            per_file.append([raw])
            continue
        docs = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from None
            docs.append(text)
        per_file.append(docs)
    return per_file


def heldout_windows(uri: str, tokenizer: GLMTokenizer, max_tokens: int, window: int) -> list[list[int]]:
    """Token windows of at most `window` tokens, `max_tokens` in all, taken from the end of each
    file round-robin (the end of a corpus file is the part least likely trained on first)."""
    queues = [list(reversed(docs)) for docs in read_documents(uri)]
    windows: list[list[int]] = []
    total = 0
    while total < max_tokens and any(queues):
        for queue in queues:
            if not queue or total >= max_tokens:
                continue
            ids = tokenizer.encode(queue.pop(0))
            for start in range(0, len(ids), window):
                chunk = ids[start:start + window][: max_tokens - total]
                if len(chunk) >= 8:  # too short to have context and targets
                    windows.append(chunk)
                    total += len(chunk)
    if not windows:
        raise ValueError(f"{uri}: no text to measure perplexity on")
    return windows


def gmask_batches(windows: list[list[int]], tokenizer: GLMTokenizer, use_2d: bool, batch_size: int,
                  device: torch.device | str = "cpu") -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """(model inputs, number of predicted tokens) per batch of windows laid out as [gMASK]
    samples: the first quarter of each window is context, the rest is predicted."""
    samples = [layout_gmask(w, len(w) // 4, tokenizer.special, use_2d=use_2d) for w in windows]
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        seq_len = max(len(s) for s in batch)
        rows = [pack_samples([s], seq_len, tokenizer.special.pad) for s in batch]
        yield ({k: torch.tensor([r[k] for r in rows], device=device) for k in rows[0]},
               sum(s.num_targets for s in batch))


@torch.no_grad()
def perplexity(model, windows: list[list[int]], tokenizer: GLMTokenizer, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of the windows' Part-B tokens under `model`."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for inputs, targets in gmask_batches(windows, tokenizer, model.config.uses_2d_positions, batch_size, device):
        nll += model(**inputs).loss.item() * targets  # the loss is the mean over this batch's targets
        count += targets
    return math.exp(nll / count)

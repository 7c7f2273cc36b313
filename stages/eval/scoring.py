"""Scoring with a GLM in the layouts it was trained with (glm.schema): log-probs of
continuations given a context, sliding-window NLL, and batched generation.

Multiple choice, GLM-130B style: the context is the bidirectional Part A ending in the mask,
each choice is a Part-B span `[sop] + choice` scored by the sum of its tokens' log-probs. The
schema's attention rule cannot put several choices in one sequence without them seeing each
other (choices in one segment are causal to each other; in separate segments they lose the
context), so the context is encoded once per item with the KV cache and all choices of a
batch of items are scored in one forward as rows sharing their item's cached context.
Log-probs are computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from glm.generation import GenerationConfig, SpanQuery, generate_spans
from glm.model import GLMModel
from glm.schema import IGNORE_INDEX, SpecialTokens, layout_gmask, part_b_positions

Progress = Callable[[int], None]


@dataclass
class ContinuationScore:
    """Score of one continuation (a Part-B span) given its context."""

    logprob: float
    """Sum of the continuation tokens' log-probs."""
    tokens: int
    """Number of continuation tokens."""
    greedy: bool
    """Every continuation token is the arg-max prediction (LAMBADA's criterion)."""


def _device(model: GLMModel) -> torch.device:
    return next(model.parameters()).device


def _order_longest_first(lengths: list[int]) -> list[int]:
    """Indices by decreasing length (less padding per batch), ties in input order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


@torch.no_grad()
def _score_batch(model: GLMModel, special: SpecialTokens, mask_token: int,
                 requests: list[tuple[list[int], list[list[int]]]]) -> list[list[ContinuationScore]]:
    """One context forward (cached) and one forward over all continuations of `requests`."""
    device = _device(model)
    use_2d, is_gmask = model.config.uses_2d_positions, mask_token == special.gmask
    part_as = [prompt + [mask_token] for prompt, _ in requests]
    B, L = len(part_as), max(len(a) for a in part_as)
    ids = torch.full((B, L), special.pad, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    seg = torch.zeros(B, L, dtype=torch.long)
    for i, a in enumerate(part_as):  # left-padded: every context ends at column L - 1
        ids[i, L - len(a):] = torch.tensor(a)
        pos[i, L - len(a):] = torch.arange(len(a))
        seg[i, L - len(a):] = 1
    seg, ids, pos = seg.to(device), ids.to(device), pos.to(device)
    out = model(ids, pos, torch.zeros_like(pos), seg, seg, use_cache=True)  # prefix = every real token

    rows = [(i, c) for i, (_, conts) in enumerate(requests) for c in conts]
    R, T = len(rows), max(len(c) for _, c in rows)
    r_ids = torch.full((R, T), special.pad, dtype=torch.long)
    r_tgt = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    r_pos = torch.zeros(R, T, dtype=torch.long)
    r_blk = torch.zeros(R, T, dtype=torch.long)
    r_seg = torch.zeros(R, T, dtype=torch.long)
    for r, (i, c) in enumerate(rows):
        n_a, n = len(part_as[i]), len(c)
        p, b = part_b_positions(n_a - 1, n_a, n, is_gmask=is_gmask, use_2d=use_2d)
        r_ids[r, :n] = torch.tensor([special.sop] + c[:-1])
        r_tgt[r, :n] = torch.tensor(c)
        r_pos[r, :n], r_blk[r, :n], r_seg[r, :n] = torch.tensor(p), torch.tensor(b), 1
    owner = torch.tensor([i for i, _ in rows], device=device)
    cache = [(k.index_select(0, owner), v.index_select(0, owner)) for k, v in out.past_key_values]
    r_seg = r_seg.to(device)
    seg_all = torch.cat((seg.index_select(0, owner), r_seg), dim=1)  # (R, L + T)
    prefix_all = torch.cat((seg.index_select(0, owner), torch.zeros_like(r_seg)), dim=1)
    logits = model(r_ids.to(device), r_pos.to(device), r_blk.to(device), seg_all, prefix_all,
                   past_key_values=cache).logits.float()  # (R, T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    r_tgt = r_tgt.to(device)
    valid = r_tgt != IGNORE_INDEX
    token_lp = logprobs.gather(-1, r_tgt.clamp(min=0)[..., None]).squeeze(-1) * valid  # (R, T)
    hits = (logits.argmax(-1) == r_tgt) | ~valid
    sums, counts, greedy = token_lp.sum(1).tolist(), valid.sum(1).tolist(), hits.all(1).tolist()
    scores: list[list[ContinuationScore]] = [[] for _ in requests]
    for r, (i, _) in enumerate(rows):
        scores[i].append(ContinuationScore(sums[r], int(counts[r]), bool(greedy[r])))
    return scores


def score_continuations(
    model: GLMModel,
    special: SpecialTokens,
    requests: list[tuple[list[int], list[list[int]]]],
    *,
    mask_token: int,
    max_len: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[list[ContinuationScore]]:
    """Scores of each request's continuations: request = (prompt ids, [continuation ids, ...]).

    Layout per continuation: prompt + [mask] (Part A), then [sop] + continuation[:-1] predicting
    the continuation. Prompts longer than `max_len` allows with the longest continuation are
    cut from the left; continuations must be non-empty and fit in max_len - 2 tokens.
    """
    trimmed = []
    for prompt, conts in requests:
        longest = max(len(c) for c in conts)
        if min(len(c) for c in conts) == 0 or longest > max_len - 2:
            raise ValueError(f"continuations must have 1 to {max_len - 2} tokens, got lengths {[len(c) for c in conts]}")
        room = max_len - 1 - longest
        trimmed.append((prompt[max(0, len(prompt) - room):], conts))
    order = _order_longest_first([len(p) + max(map(len, c)) for p, c in trimmed])
    scores: list[list[ContinuationScore]] = [[] for _ in requests]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, s in zip(chunk, _score_batch(model, special, mask_token, [trimmed[i] for i in chunk])):
            scores[i] = s
        if progress:
            progress(len(chunk))
    return scores


def _windows(tokens: list[int], max_len: int, stride: int) -> list[tuple[list[int], int]]:
    """(window tokens, prefix length) covering `tokens`: each window scores up to `stride` new
    tokens after as much preceding context as fits in max_len (with [gMASK] and [sop])."""
    out = []
    for start in range(0, len(tokens), stride):
        end = min(start + stride, len(tokens))
        context_start = max(0, end - (max_len - 1))  # window + [gMASK] fills max_len
        out.append((tokens[context_start:end], start - context_start))
    return out


@torch.no_grad()
def window_nll(
    model: GLMModel,
    special: SpecialTokens,
    documents: list[list[int]],
    *,
    max_len: int,
    stride: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens scored) per document, every token scored exactly once.

    Sliding windows in the [gMASK] layout (glm.schema.layout_gmask): the preceding tokens are the
    bidirectional context, the `stride` new tokens the causal Part B. The first token of a
    document is predicted from [gMASK] [sop] alone.
    """
    device, use_2d = _device(model), model.config.uses_2d_positions
    samples = []
    for doc, tokens in enumerate(documents):
        for window, prefix_len in _windows(tokens, max_len, stride):
            samples.append((doc, layout_gmask(window, prefix_len, special, use_2d=use_2d)))
    totals = [[0.0, 0] for _ in documents]
    order = _order_longest_first([len(s) for _, s in samples])
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        B, T = len(chunk), max(len(s) for _, s in chunk)
        cols = {name: torch.zeros(B, T, dtype=torch.long) for name in ("input_ids", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")}
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        cols["input_ids"].fill_(special.pad)
        for row, (_, s) in enumerate(chunk):
            n = len(s)
            cols["input_ids"][row, :n] = torch.tensor(s.input_ids)
            cols["position_ids"][row, :n] = torch.tensor(s.position_ids)
            cols["block_position_ids"][row, :n] = torch.tensor(s.block_position_ids)
            cols["segment_ids"][row, :n] = 1
            cols["prefix_mask"][row, :n] = torch.tensor(s.prefix_mask)
            labels[row, :n] = torch.tensor(s.labels)
        logits = model(**{k: v.to(device) for k, v in cols.items()}).logits.float()  # (B, T, V)
        labels = labels.to(device)
        valid = labels != IGNORE_INDEX
        nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
        for row, (doc, _) in enumerate(chunk):
            totals[doc][0] += float(nll[row].sum())
            totals[doc][1] += int(valid[row].sum())
        if progress:
            progress(len(chunk))
    return [(nll, n) for nll, n in totals]


def generate_answers(
    model: GLMModel,
    special: SpecialTokens,
    prompts: list[list[int]],
    *,
    mask_token: int,
    max_len: int,
    config: GenerationConfig,
    vocab_limit: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[list[int]]:
    """Generated span token ids for each prompt: Part A = prompt + [mask], then [sop] + generation."""
    room = max_len - config.max_new_tokens - 2
    if room < 1:
        raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room for a context in max_len {max_len}")
    queries = [SpanQuery(p[max(0, len(p) - room):] + [mask_token], min(len(p), room), mask_token == special.gmask)
               for p in prompts]
    order = _order_longest_first([len(q.part_a) for q in queries])
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, span in zip(chunk, generate_spans(model, [queries[i] for i in chunk], special, config, vocab_limit)):
            outputs[i] = span
        if progress:
            progress(len(chunk))
    return outputs

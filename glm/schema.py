"""The sample schema (the one contract between data and every trainer) and GLM layouts.

One row is one fixed-length sequence with int32 columns of length L:
`input_ids`, `labels` (-100 = no loss), `position_ids`, `block_position_ids`,
`segment_ids` (packed sample index, 0 = padding) and `prefix_mask` (1 = bidirectional Part A).

Attention rule for query q and key k: same non-zero segment, and either k is a prefix
token, or q is not a prefix token and k <= q. The layout functions below turn token lists
into samples exactly as GLM_SPEC.md sections 1-2 describe; the data stage, SFT and
generation all use them, so there is one definition of where a Part-B token sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the mask is built, so data workers stay light
    import torch

IGNORE_INDEX = -100
COLUMNS = ("input_ids", "labels", "position_ids", "block_position_ids", "segment_ids", "prefix_mask")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of GLM's special tokens in a tokenizer."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    pad: int
    eos: int

    @property
    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


@dataclass
class Sample:
    """One unpacked sample: parallel lists, one entry per token (segment 1, unpadded)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    block_position_ids: list[int] = field(default_factory=list)
    prefix_mask: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def extend(self, ids, labels, pos, block, prefix) -> None:
        for column, values in zip(
            (self.input_ids, self.labels, self.position_ids, self.block_position_ids, self.prefix_mask),
            (ids, labels, pos, block, prefix),
        ):
            column.extend(values)

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def part_b_positions(
    mask_position: int, part_a_len: int, count: int, *, is_gmask: bool, use_2d: bool, start: int = 0
) -> tuple[list[int], list[int]]:
    """Positions of the Part-B tokens number start .. start+count-1 of the span for one mask.

    2D: every token takes the mask's position; block positions count 1, 2, ...
    1D: a [gMASK] span continues the positions after Part A; a [MASK] span takes the mask's
    position with no block dimension (GLM-130B, paper appendix B.3).
    """
    steps = range(start, start + count)
    if use_2d:
        return [mask_position] * count, [s + 1 for s in steps]
    if is_gmask:
        return [part_a_len + s for s in steps], [0] * count
    return [mask_position] * count, [0] * count


def layout_blank_infilling(
    tokens: list[int], spans: list[tuple[int, int]], special: SpecialTokens, *, use_2d: bool
) -> Sample:
    """A [MASK] sample: `spans` are (start, end) token ranges in Part-B order (already shuffled).

    Part A is `tokens` with each span replaced by one [MASK]; each span then follows as input
    [sop] + span with targets span + [eop].
    """
    ordered = sorted(spans)
    for (s0, e0), (s1, _) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise ValueError(f"overlapping spans {ordered}")
    part_a: list[int] = []
    mask_pos: dict[tuple[int, int], int] = {}
    cursor = 0
    for start, end in ordered:
        if not 0 <= start < end <= len(tokens):
            raise ValueError(f"span ({start}, {end}) outside a text of {len(tokens)} tokens")
        part_a.extend(tokens[cursor:start])
        mask_pos[(start, end)] = len(part_a)
        part_a.append(special.mask)
        cursor = end
    part_a.extend(tokens[cursor:])
    n_a = len(part_a)
    sample = Sample()
    sample.extend(part_a, [IGNORE_INDEX] * n_a, range(n_a), [0] * n_a, [1] * n_a)
    for start, end in spans:
        span = tokens[start:end]
        pos, block = part_b_positions(mask_pos[(start, end)], n_a, len(span) + 1, is_gmask=False, use_2d=use_2d)
        sample.extend([special.sop] + span, span + [special.eop], pos, block, [0] * (len(span) + 1))
    return sample


def layout_gmask(tokens: list[int], prefix_len: int, special: SpecialTokens, *, use_2d: bool) -> Sample:
    """A [gMASK] sample: keep tokens[:prefix_len], generate the rest.

    Input prefix + [gMASK, sop] + suffix[:-1]; targets at the Part-B positions are the suffix
    (no [eop] after a suffix span, as in the original code).
    """
    if not 0 <= prefix_len < len(tokens):
        raise ValueError(f"prefix_len {prefix_len} must leave a non-empty suffix of {len(tokens)} tokens")
    prefix, suffix = tokens[:prefix_len], tokens[prefix_len:]
    part_a = prefix + [special.gmask]
    n_a = len(part_a)
    sample = Sample()
    sample.extend(part_a, [IGNORE_INDEX] * n_a, range(n_a), [0] * n_a, [1] * n_a)
    pos, block = part_b_positions(n_a - 1, n_a, len(suffix), is_gmask=True, use_2d=use_2d)
    sample.extend([special.sop] + suffix[:-1], suffix, pos, block, [0] * len(suffix))
    return sample


def layout_prompted(
    prompt: list[int],
    answer: list[int],
    special: SpecialTokens,
    *,
    use_2d: bool,
    mask_token: int | None = None,
    max_len: int | None = None,
) -> Sample:
    """A prompted sample (MIP, SFT): prompt + [MASK or gMASK, sop] + answer, targets answer + [eop].

    The prompt is the bidirectional prefix. When longer than `max_len`, the prompt is cut
    from the left; the answer is never cut (ValueError if it alone does not fit).
    """
    mask_token = special.mask if mask_token is None else mask_token
    if max_len is not None:
        room = max_len - len(answer) - 2  # mask + sop
        if room < 0:
            raise ValueError(f"answer of {len(answer)} tokens does not fit in {max_len}")
        prompt = prompt[len(prompt) - room:] if len(prompt) > room else prompt
    part_a = list(prompt) + [mask_token]
    n_a = len(part_a)
    sample = Sample()
    sample.extend(part_a, [IGNORE_INDEX] * n_a, range(n_a), [0] * n_a, [1] * n_a)
    pos, block = part_b_positions(
        n_a - 1, n_a, len(answer) + 1, is_gmask=mask_token == special.gmask, use_2d=use_2d
    )
    sample.extend([special.sop] + list(answer), list(answer) + [special.eop], pos, block, [0] * (len(answer) + 1))
    return sample


def pack_samples(samples: list[Sample], seq_len: int, pad_id: int) -> dict[str, list[int]]:
    """Pack samples into one row of the schema: segment ids 1..k, padding (segment 0) at the end."""
    row: dict[str, list[int]] = {c: [] for c in COLUMNS}
    for seg, s in enumerate(samples, start=1):
        row["input_ids"] += s.input_ids
        row["labels"] += s.labels
        row["position_ids"] += s.position_ids
        row["block_position_ids"] += s.block_position_ids
        row["prefix_mask"] += s.prefix_mask
        row["segment_ids"] += [seg] * len(s)
    n = len(row["input_ids"])
    if n > seq_len:
        raise ValueError(f"packed samples take {n} tokens, more than seq_len {seq_len}")
    pad = seq_len - n
    row["input_ids"] += [pad_id] * pad
    row["labels"] += [IGNORE_INDEX] * pad
    for c in ("position_ids", "block_position_ids", "segment_ids", "prefix_mask"):
        row[c] += [0] * pad
    return row


def attention_mask(segment_ids: "torch.Tensor", prefix_mask: "torch.Tensor", num_queries: int | None = None) -> "torch.Tensor":
    """The attention rule as a boolean mask (B, 1, Tq, Tk); True = may attend.

    segment_ids, prefix_mask: (B, Tk) for all keys (cached + new). The queries are the last
    `num_queries` tokens (all by default, fewer when decoding with a KV cache). A padding
    query attends only to itself, so its (unused) output stays finite.
    """
    import torch

    B, Tk = segment_ids.shape
    Tq = Tk if num_queries is None else num_queries
    key_idx = torch.arange(Tk, device=segment_ids.device)
    query_idx = key_idx[Tk - Tq:]
    seg_k, pre_k = segment_ids[:, None, :], prefix_mask[:, None, :].bool()  # (B, 1, Tk)
    seg_q = segment_ids[:, Tk - Tq:, None]  # (B, Tq, 1)
    pre_q = prefix_mask[:, Tk - Tq:, None].bool()
    causal = key_idx[None, None, :] <= query_idx[None, :, None]  # (1, Tq, Tk)
    allowed = (seg_q == seg_k) & (seg_q != 0) & (pre_k | (~pre_q & causal))
    allowed |= key_idx[None, None, :] == query_idx[None, :, None]
    return allowed[:, None]  # (B, 1, Tq, Tk)

"""Statistics of the blank-infilling builder over many samples (GLM_SPEC.md section 1)."""

import statistics

import pytest

from glm.schema import IGNORE_INDEX, SpecialTokens
from stages.data.blank_infilling import KIND_GMASK, KIND_MASK, BlankInfillingBuilder, pack_prompted, sample_rng
from stages.data.config import ObjectiveConfig

S = SpecialTokens(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=0, eos=2)


def builder(**kw) -> BlankInfillingBuilder:
    return BlankInfillingBuilder(ObjectiveConfig(**kw), S, seed=7)


def test_mask_spans_cover_15_percent_with_mean_length_near_3():
    b = builder()
    coverages, lengths = [], []
    for i in range(400):
        spans = b.mask_spans(b.window_text, sample_rng(7, "t", i))
        ordered = sorted(spans)
        assert all(e0 < s1 for (_, e0), (s1, _) in zip(ordered, ordered[1:]))  # >= 1 token between spans
        assert all(0 <= s < e <= b.window_text for s, e in spans)
        lengths += [e - s for s, e in spans]
        coverages.append(sum(e - s for s, e in spans) / b.window_text)
    assert abs(statistics.mean(coverages) - 0.15) < 0.005
    assert 2.7 < statistics.mean(lengths) < 3.3  # Poisson(3) clipped to 1..39, last span trimmed to the target
    assert max(lengths) <= 39


def test_rows_split_30_70_and_gmask_ratios_in_range():
    b = builder(seq_len=512, mask_window=128)
    stream = list(range(10, 10 + 400_000))
    rows = b.build_stream(stream, "train", 0)
    kinds = [r.kind for r in rows[:-1]]
    share = kinds.count(KIND_MASK) / len(kinds)
    n = len(kinds)
    assert abs(share - 0.3) < 3 * (0.3 * 0.7 / n) ** 0.5 + 0.01  # binomial: within 3 sigma
    ratios = []
    for r in rows[:-1]:
        if r.kind == KIND_GMASK:
            targets = sum(1 for t in r.row["labels"] if t != IGNORE_INDEX)
            ratios.append(targets / r.text_tokens)
    assert min(ratios) >= 0.2 - 1 / 511 and max(ratios) <= 1.0
    assert abs(statistics.mean(ratios) - 0.6) < 0.02  # U(0.2, 1.0)
    assert sum(r.text_tokens for r in rows) == len(stream)  # every token used once


def test_rows_fit_and_are_deterministic_per_index():
    b = builder(seq_len=256, mask_window=64)
    stream = list(range(10, 30_010))
    a, c = b.build_stream(stream, "train", 3), b.build_stream(stream, "train", 3)
    assert [r.row for r in a] == [r.row for r in c]
    assert all(len(r.row["input_ids"]) == 256 for r in a)
    assert b.build_stream(stream, "train", 4)[0].row != a[0].row  # another bucket, other randomness


@pytest.mark.parametrize("use_2d", [True, False])
def test_mask_rows_pack_four_windows(use_2d):
    b = builder(position_encoding="rope_2d" if use_2d else "rope_1d")
    row = b.build(list(range(10, 10 + b.tokens_needed(KIND_MASK))), KIND_MASK, sample_rng(1, 0)).row
    assert max(row["segment_ids"]) == 4
    assert any(row["block_position_ids"]) == use_2d


def test_pack_prompted_respects_row_capacity():
    from glm.schema import layout_prompted

    samples = [layout_prompted([11] * n, [12] * 3, S, use_2d=True) for n in (10, 50, 20, 100, 5, 5, 5, 5)]
    rows = pack_prompted(samples, seq_len=128, window=32, pad_id=0)
    assert sum(max(r["segment_ids"]) for r in rows) == len(samples)
    assert all(max(r["segment_ids"]) <= 4 and len(r["input_ids"]) == 128 for r in rows)

"""The layouts reproduce GLM_SPEC.md's worked examples; packing and the attention rule."""

import torch

from glm.schema import (
    IGNORE_INDEX as X, SpecialTokens, attention_mask, layout_blank_infilling, layout_gmask,
    layout_prompted, pack_samples,
)

S = SpecialTokens(mask=101, smask=102, gmask=103, sop=104, eop=105, pad=0, eos=2)
x1, x2, x3, x4, x5, x6 = 11, 12, 13, 14, 15, 16


def test_mask_sample_matches_spec_worked_example():
    s = layout_blank_infilling([x1, x2, x3, x4, x5, x6], [(4, 6), (2, 3)], S, use_2d=True)
    assert s.input_ids == [x1, x2, S.mask, x4, S.mask, S.sop, x5, x6, S.sop, x3]
    assert s.labels == [X, X, X, X, X, x5, x6, S.eop, x3, S.eop]
    assert s.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert s.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.prefix_mask == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]


def test_mask_sample_1d_drops_block_dimension():
    s = layout_blank_infilling([x1, x2, x3, x4, x5, x6], [(4, 6), (2, 3)], S, use_2d=False)
    assert s.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert s.block_position_ids == [0] * 10


def test_gmask_sample_matches_spec_worked_example():
    toks = [x1, x2, x3, x4, x5, x6]
    s1 = layout_gmask(toks, 3, S, use_2d=False)
    assert s1.input_ids == [x1, x2, x3, S.gmask, S.sop, x4, x5]
    assert s1.labels == [X, X, X, X, x4, x5, x6]
    assert s1.position_ids == [0, 1, 2, 3, 4, 5, 6]
    assert s1.prefix_mask == [1, 1, 1, 1, 0, 0, 0]
    s2 = layout_gmask(toks, 3, S, use_2d=True)
    assert s2.position_ids == [0, 1, 2, 3, 3, 3, 3]
    assert s2.block_position_ids == [0, 0, 0, 0, 1, 2, 3]


def test_prompted_sample_truncates_prompt_from_the_left_never_the_answer():
    s = layout_prompted([1, 2, 3, 4, 5], [7, 8], S, use_2d=True, max_len=8)
    assert s.input_ids == [2, 3, 4, 5, S.mask, S.sop, 7, 8]
    assert s.labels == [X] * 5 + [7, 8, S.eop]
    assert len(s) == 8


def test_pack_assigns_segments_and_pads():
    a = layout_gmask([1, 2, 3], 1, S, use_2d=True)
    b = layout_gmask([4, 5], 1, S, use_2d=True)
    row = pack_samples([a, b], 12, pad_id=S.pad)
    assert row["segment_ids"] == [1] * 4 + [2] * 3 + [0] * 5
    assert row["labels"][-5:] == [X] * 5
    assert all(len(v) == 12 for v in row.values())


def test_attention_rule_mask():
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 0]])
    pre = torch.tensor([[1, 1, 0, 0, 1, 0, 0]])
    m = attention_mask(seg, pre)[0, 0].int().tolist()
    assert m == [
        [1, 1, 0, 0, 0, 0, 0],  # prefix query: all prefix keys of its segment, no Part B
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # Part B: prefix + causal
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],  # second packed segment sees only itself
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding: only itself (keeps its output finite)
    ]
    # decoding with a cache: the last query row of the full mask
    assert attention_mask(seg, pre, num_queries=2)[0, 0].tolist() == attention_mask(seg, pre)[0, 0, -2:].tolist()

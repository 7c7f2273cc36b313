"""Count-model baselines: the unigram and bigram perplexities the pipeline compares models with."""

import math

import numpy as np

from glm.schema import SpecialTokens, layout_blank_infilling, layout_gmask, pack_samples
from stages.data.baselines import CountModels, row_pairs, split_baselines, window_pairs

SPECIAL = SpecialTokens(mask=90, smask=91, gmask=92, sop=93, eop=94, pad=0, eos=95)


def test_unigram_is_add_one_and_bigram_learns_a_deterministic_sequence():
    models = CountModels(vocab_size=10)
    models.add_sequence([1, 2, 3] * 50)
    prev, tok = np.array([1, 2, 3]), np.array([2, 3, 1])
    assert np.allclose(models.unigram_prob(tok), (50 + 1) / (150 + 10))
    ppl = models.perplexities(prev, tok)
    assert math.isclose(ppl["unigram_ppl"], 160 / 51, rel_tol=1e-9)
    assert ppl["bigram_ppl"] < 1.05  # each token always follows the same one
    assert models.bigram_prob(np.array([-1]), np.array([2]))[0] == models.unigram_prob(np.array([2]))[0]
    assert models.bigram_prob(np.array([7]), np.array([2]))[0] == models.unigram_prob(np.array([2]))[0]  # unseen context


def test_row_pairs_take_the_text_token_before_each_span():
    tokens = list(range(10, 30))
    gmask = layout_gmask(tokens, 5, SPECIAL, use_2d=True)
    mask = layout_blank_infilling(tokens, [(12, 15), (3, 5)], SPECIAL, use_2d=True)
    for sample, expected in ((gmask, [(14, 15)] + list(zip(tokens[5:-1], tokens[6:]))),
                             (mask, [(21, 22), (22, 23), (23, 24), (24, SPECIAL.eop), (12, 13), (13, 14), (14, SPECIAL.eop)])):
        row = pack_samples([sample, layout_gmask(tokens[:6], 3, SPECIAL, use_2d=True)], 64, SPECIAL.pad)
        prev, tok = row_pairs(*(np.array([row[k]]) for k in ("input_ids", "labels", "position_ids", "segment_ids")),
                              SPECIAL.mask_ids, SPECIAL.sop)
        pairs = list(zip(prev.tolist(), tok.tolist()))
        assert pairs[:len(expected)] == expected
        assert pairs[len(expected):] == [(12, 13), (13, 14), (14, 15)]  # the second packed sample


def test_window_pairs_and_split_baselines():
    prev, tok = window_pairs([list(range(8)), list(range(20, 28))])
    assert tok.tolist() == [2, 3, 4, 5, 6, 7, 22, 23, 24, 25, 26, 27]
    assert prev.tolist() == [1, 2, 3, 4, 5, 6, 21, 22, 23, 24, 25, 26]
    rows = [pack_samples([layout_gmask(list(range(10, 40)), 8, SPECIAL, use_2d=True)], 40, SPECIAL.pad)] * 3
    arrays = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    result = split_baselines(arrays, arrays, 100, SPECIAL.mask_ids, SPECIAL.sop)
    assert result["tokens"] == 3 * 22 and result["bigram_ppl"] < 1.5 < 20 < result["unigram_ppl"]

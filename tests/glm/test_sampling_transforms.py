"""The sampling transforms of the OpenAI parameters: penalties and logit bias exactly as their
formulas, min-p after temperature, and the n-gram repetition guard still working beside them."""

import pytest
import torch

from glm.config import preset
from glm.generation import GenerationConfig, SpanQuery, apply_penalties, generate_spans, process_logits, sample_next
from glm.model import GLMModel
from glm.schema import SpecialTokens

S = SpecialTokens(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=0, eos=2)


def test_penalties_and_bias_match_a_hand_computation():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0, -1.0]])
    history = [0, 1, 3, 3, 2]  # Part A [0, 1], then the span generated so far: [3, 3, 2]
    config = GenerationConfig(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                              logit_bias={5: 10.0, 0: -1.0})
    out = process_logits(logits, [history], 3, [], config, None)
    # repetition over {0, 1, 2, 3} (the whole sequence): positive / 2, negative x 2 -> 0.5, -4, 0.25, 1.5
    # token 3 generated twice: 1.5 - 0.25 * 2 - 0.5 = 0.5; token 2 once: 0.25 - 0.25 - 0.5 = -0.5
    # bias: token 5: -1 + 10 = 9; token 0: 0.5 - 1 = -0.5; token 4 untouched
    assert out.tolist() == [[-0.5, -4.0, -0.5, 0.5, 0.0, 9.0]]


def test_presence_and_frequency_count_only_the_generated_span_per_row():
    logits = torch.zeros(2, 5)
    config = GenerationConfig(presence_penalty=1.0, frequency_penalty=0.5)
    apply_penalties(logits, [[4, 4, 4, 1, 1], [4, 2, 3, 3, 3]], 2, config)
    # row 0's span is [1, 1] (the 4s are Part A: not penalised); row 1's is [3, 3]
    assert logits.tolist() == [[0.0, -2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0, 0.0]]
    untouched = torch.zeros(1, 5)
    apply_penalties(untouched, [[1, 2]], 0, config)  # nothing generated yet
    assert untouched.tolist() == [[0.0] * 5]


def test_bans_still_win_over_a_positive_bias():
    logits = torch.zeros(1, 10)
    out = process_logits(logits, [[1]], 0, [7], GenerationConfig(min_new_tokens=1, logit_bias={7: 100.0, 9: 100.0}),
                         vocab_limit=8)
    assert out[0, 7] < -1e30 and out[0, 9] < -1e30  # min length and the vocabulary limit stay bans
    assert out.argmax().item() not in (7, 9)


def test_min_p_keeps_tokens_near_the_top_after_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    kept = set(sample_next(logits, GenerationConfig(do_sample=True, min_p=0.5), g).tolist())
    assert kept == {0, 1}  # p >= 0.5 x 0.5
    # temperature 10 flattens the distribution first: the smallest is 0.1 ** 0.1 = 0.79 of the largest
    flat = set(sample_next(logits, GenerationConfig(do_sample=True, min_p=0.5, temperature=10.0), g).tolist())
    assert flat == {0, 1, 2, 3}
    one = set(sample_next(logits, GenerationConfig(do_sample=True, min_p=1.0), g).tolist())
    assert one == {0}


@pytest.mark.parametrize("bad", [dict(repetition_penalty=0.0), dict(repetition_penalty=float("inf")),
                                 dict(min_p=1.5), dict(presence_penalty=float("nan")),
                                 dict(logit_bias={1: float("inf")})])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def tiny_model() -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=64)).double().eval()


def test_logit_bias_forces_a_token_and_the_ngram_guard_still_holds():
    model, query = tiny_model(), SpanQuery([11, 12, 13, S.gmask], 3, True)
    [forced] = generate_spans(model, [query], S, GenerationConfig(max_new_tokens=6, logit_bias={40: 100.0}))
    assert forced == [40] * 6
    # no 2-gram twice: after 40 40 the guard bans 40, whatever the bias
    [guarded] = generate_spans(model, [query], S, GenerationConfig(max_new_tokens=6, logit_bias={40: 100.0},
                                                                   no_repeat_ngram_size=2))
    assert guarded[:2] == [40, 40] and guarded[2] != 40
    pairs = list(zip(guarded, guarded[1:]))
    assert len(pairs) == len(set(pairs))

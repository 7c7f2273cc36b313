"""Generation: greedy / beam / sampling, no-repeat n-grams, left padding, blank filling, chat."""

import pytest
import torch

from glm.config import padded_vocab_size, preset
from glm.generation import (
    GenerationConfig, SpanQuery, banned_ngram_tokens, beam_search, build_chat_prompt, chat, fill_blanks,
    generate_spans, process_logits, sample_next,
)
from glm.model import GLMModel
from glm.schema import SpecialTokens

S = SpecialTokens(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=0, eos=2)


def model_for(vocab: int = 512, **overrides) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=vocab, **overrides)).double().eval()


def queries():
    return [
        SpanQuery([11, 12, 13, 14, 15, S.gmask], 5, True),
        SpanQuery([21, 22, S.mask, 24], 2, False),
        SpanQuery([31, 32, 33, S.mask, 35, 36, 37, 38, 39], 3, False),
    ]


@pytest.mark.parametrize("encoding", ["rope_1d", "rope_2d"])
def test_left_padded_batch_equals_unpadded_single(encoding):
    model = model_for(position_encoding=encoding)
    config = GenerationConfig(max_new_tokens=10)
    batched = generate_spans(model, queries(), S, config)
    single = [generate_spans(model, [q], S, config)[0] for q in queries()]
    assert batched == single
    assert all(len(s) > 0 for s in batched)


def test_one_beam_equals_greedy():
    model = model_for()
    config = GenerationConfig(max_new_tokens=12)
    for q in queries():
        greedy = generate_spans(model, [q], S, config)[0]
        assert beam_search(model, q, S, GenerationConfig(max_new_tokens=12, num_beams=1)) == greedy


def test_one_beam_equals_greedy_when_a_stop_token_wins():
    model = model_for()
    config = GenerationConfig(max_new_tokens=30)
    third = generate_spans(model, [queries()[0]], S, config)[0][2]
    with torch.no_grad():  # [eop] now wins wherever that token would have
        model.lm_head.weight[S.eop] = model.lm_head.weight[third] * 1.05
    stopped = 0
    for q in queries():
        greedy = generate_spans(model, [q], S, config)[0]
        stopped += len(greedy) < 30
        assert beam_search(model, q, S, GenerationConfig(max_new_tokens=30, num_beams=1)) == greedy
    assert stopped  # the stop path was exercised


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_holds(beams):
    model = model_for()
    q = queries()[0]
    config = GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=2, num_beams=beams)
    span = generate_spans(model, [q], S, config)[0]
    seq = q.part_a + [S.sop] + span
    bigrams = list(zip(seq, seq[1:]))
    assert len(span) > 10 and len(bigrams) == len(set(bigrams))


def test_beam_search_is_at_least_as_likely_as_greedy():
    model = model_for()
    q = queries()[1]
    greedy = generate_spans(model, [q], S, GenerationConfig(max_new_tokens=6))[0]
    beam = beam_search(model, q, S, GenerationConfig(max_new_tokens=6, num_beams=4, length_penalty=0.0))

    def logprob(span):
        ids = q.part_a + [S.sop] + span
        n = len(q.part_a)
        pos = list(range(n)) + [q.mask_index] * (len(span) + 1)
        block = [0] * n + list(range(1, len(span) + 2))
        with torch.no_grad():
            out = model(torch.tensor([ids]), torch.tensor([pos]), torch.tensor([block]),
                        torch.ones(1, len(ids), dtype=torch.long), torch.tensor([[1] * n + [0] * (len(span) + 1)]))
        lp = torch.log_softmax(out.logits[0, n:-1].float(), -1)
        return lp[torch.arange(len(span)), torch.tensor(span)].sum().item()

    assert len(beam) == len(greedy) == 6
    assert logprob(beam) >= logprob(greedy) - 1e-9


def test_banned_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 1], 2) == {2}
    assert banned_ngram_tokens([5], 2) == set()


def test_min_new_tokens_and_vocab_limit_block_tokens():
    logits = torch.zeros(1, 10)
    out = process_logits(logits, [[1]], 0, [7], GenerationConfig(min_new_tokens=2), vocab_limit=8)
    assert out[0, 7] < -1e30 and out[0, 8] < -1e30 and out[0, 9] < -1e30 and out[0, 3] == 0


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(1)
    assert set(sample_next(logits, GenerationConfig(do_sample=True, top_k=1), g).tolist()) == {2}
    assert set(sample_next(logits, GenerationConfig(do_sample=True, top_p=0.01), g).tolist()) == {2}
    assert set(sample_next(logits, GenerationConfig(do_sample=True, top_k=2), g).tolist()) == {2, 3}
    model = model_for()
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=123)
    assert generate_spans(model, queries(), S, cfg) == generate_spans(model, queries(), S, cfg)


def test_blank_filling_replaces_each_mask(tokenizer):
    model = model_for(vocab=padded_vocab_size(len(tokenizer)))
    s = tokenizer.special
    text = "天下大势，[MASK]久必合，合久必分。The quick [MASK] fox."
    [result] = fill_blanks(model, tokenizer, [text], GenerationConfig(max_new_tokens=5))
    ids, masks = tokenizer.encode_with_masks(text)
    assert ids.count(s.mask) == 2 == masks and len(result.spans) == 2
    first, second = [i for i, t in enumerate(ids) if t == s.mask]
    expected = ids[:first] + result.spans[0] + ids[first + 1:second] + result.spans[1] + ids[second + 1:]
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected)
    assert all(t < len(tokenizer) for span in result.spans for t in span)


def test_text_without_mask_gets_gmask_appended(tokenizer):
    model = model_for(vocab=padded_vocab_size(len(tokenizer)))
    texts = ["Once upon a time", "话说天下大势"]
    results = fill_blanks(model, tokenizer, texts, GenerationConfig(max_new_tokens=4))
    for text, r in zip(texts, results):
        assert r.token_ids == tokenizer.encode(text) + r.spans[0]


def test_a_span_that_generates_a_mask_is_not_filled_again(tokenizer, monkeypatch):
    """Each of the text's own masks is filled exactly once: a mask token inside a generated span
    is text of that span (greedy decoding would otherwise refill it forever)."""
    import glm.generation as generation

    s = tokenizer.special
    calls = []

    def spans_with_masks(model, queries, special, config, vocab_limit=None, utf8=None):
        calls.append([q.mask_index for q in queries])
        return [[s.mask, 42, s.gmask] for _ in queries]

    monkeypatch.setattr(generation, "generate_spans", spans_with_masks)
    texts = ["a [MASK] b [sMASK] c", "plain text, [eop] typed"]
    results = fill_blanks(None, tokenizer, texts, GenerationConfig(max_new_tokens=3))
    assert [len(r.spans) for r in results] == [2, 1] and len(calls) == 2
    ids, _ = tokenizer.encode_with_masks(texts[0])
    first, second = [i for i, t in enumerate(ids) if t in s.mask_ids]
    assert calls[1] == [second + 2]  # the second mask, shifted by the first span (3 tokens for 1)
    assert results[1].token_ids == tokenizer.encode(texts[1]) + [s.mask, 42, s.gmask]


def test_chat_prompt_format():
    assert build_chat_prompt("你好") == "你好"
    assert build_chat_prompt("再见", [("你好", "你好！"), ("天气", "晴")]) == (
        "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：天气\n答：晴\n[Round 2]\n问：再见\n答："
    )


def test_chat_turn_returns_history(tokenizer):
    model = model_for(vocab=padded_vocab_size(len(tokenizer)))
    response, history = chat(model, tokenizer, "你好 [MASK]", config=GenerationConfig(max_new_tokens=4))
    assert history == [("你好 [MASK]", response)]
    response2, history2 = chat(model, tokenizer, "again", history, GenerationConfig(max_new_tokens=4))
    assert len(history2) == 2 and history2[1] == ("again", response2)


def test_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0)


def test_utf8_guard_keeps_generated_text_valid(tokenizer):
    """A model that prefers byte pieces (all of them raised by a logit bias) still writes valid
    UTF-8: an open character is finished by its continuation bytes, no byte starts a character
    it cannot, and U+FFFD appears nowhere (a span cut by the token limit may end mid-character)."""
    from glm.generation import Utf8Guard

    guard = Utf8Guard.of(tokenizer)
    byte = {v: i for i, v in tokenizer.byte_pieces.items()}
    assert guard.open_character([byte[0xE4]]) == b"\xe4"
    assert guard.open_character([byte[0xE4], byte[0xBD]]) == b"\xe4\xbd"
    assert guard.open_character([byte[0xE4], byte[0xBD], byte[0xA0]]) == b""
    assert guard.open_character([byte[0xBD]]) == b"" and guard.open_character([byte[0x41]]) == b""
    assert sorted(tokenizer.byte_pieces[i] for i in guard.continuations(b"\xe0")) == list(range(0xA0, 0xC0))
    assert byte[0x80] in guard.never_first and byte[0xC1] in guard.never_first and byte[0xE4] not in guard.never_first
    banned = torch.full((1, len(tokenizer)), torch.finfo(torch.float32).min)  # every token banned before the guard
    guard.mask(banned, [[byte[0xE4]]], 1)
    assert sorted(tokenizer.byte_pieces[i] for i in torch.nonzero(banned[0] == 0).flatten().tolist()) == list(range(0x80, 0xC0))

    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    special = tokenizer.special
    bias = {i: 8.0 for i in tokenizer.byte_pieces}
    ids = tokenizer.encode("你好") + [special.gmask]
    query = SpanQuery(ids, len(ids) - 1, True)
    for seed in range(4):
        config = GenerationConfig(max_new_tokens=40, do_sample=True, seed=seed, logit_bias=bias, min_new_tokens=40)
        unguarded = generate_spans(model, [query], special, config, vocab_limit=len(tokenizer))[0]
        guarded = generate_spans(model, [query], special, config, vocab_limit=len(tokenizer), utf8=guard)[0]
        assert sum(t in tokenizer.byte_pieces for t in guarded) > 20  # the bias made it spell bytes
        text = tokenizer.decode(guarded)
        assert "\ufffd" not in text.rstrip("\ufffd"), text  # the cut character's bytes may decode one by one
        if seed == 0:
            assert "\ufffd" in tokenizer.decode(unguarded)  # what the guard prevents

"""Scoring against direct, one-sequence-per-question computations with the same fixed model."""

import json
import math

import pytest
import torch

from glm.generation import GenerationConfig, SpanQuery, generate_spans
from glm.schema import IGNORE_INDEX, layout_gmask, layout_prompted
from stages.eval.config import TaskConfig
from stages.eval.scoring import score_continuations, window_nll
from stages.eval.stage import evaluate_task

from eval_models import tiny_model as build_tiny_model

@pytest.fixture
def tiny_model(tokenizer):
    """tiny_model(**GLMConfig overrides) -> the seeded tiny GLM for the session tokenizer."""
    return lambda **overrides: build_tiny_model(tokenizer, **overrides)


PROMPTS = ["The capital of France is", "话说天下大势，分久必合", "Question: is the sky blue?\nAnswer:", "x"]
CHOICES = [["Paris", "London", "a small village"], ["合久必分", "分"], ["Yes", "No", "maybe so", "never"], ["y", "z"]]


@torch.no_grad()
def sequence_logprob(model, sample, drop_last: bool = True) -> tuple[float, list[bool]]:
    """Sum of target log-probs of one unpadded sample in one plain forward (no cache, no batch),
    and whether each target is the arg-max."""
    n = len(sample) - 1 if drop_last else len(sample)  # drop_last: no [eop] target, as GLM-130B
    col = lambda xs: torch.tensor([xs[:n]])
    logits = model(col(sample.input_ids), col(sample.position_ids), col(sample.block_position_ids),
                   torch.ones(1, n, dtype=torch.long), col(sample.prefix_mask)).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    targets = [(i, y) for i, y in enumerate(sample.labels[:n]) if y != IGNORE_INDEX]
    return sum(float(logprobs[i, y]) for i, y in targets), [int(logits[i].argmax()) == y for i, y in targets]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("position_encoding", ["rope_2d", "rope_1d"])
@pytest.mark.parametrize("mask", ["mask", "gmask"])
def test_choice_scores_equal_one_sequence_per_choice(tokenizer, tiny_model, position_encoding, mask):
    model = tiny_model(position_encoding=position_encoding)
    special = tokenizer.special
    requests = [(tokenizer.encode(p), [tokenizer.encode(c) for c in cs]) for p, cs in zip(PROMPTS, CHOICES)]
    # batches of 3 and 1: left-padded contexts and right-padded choices of different lengths
    scores = score_continuations(model, special, requests, mask_token=getattr(special, mask), max_len=256, batch_size=3)
    for (prompt, conts), per_item in zip(requests, scores):
        for cont, score in zip(conts, per_item):
            sample = layout_prompted(prompt, cont, special, use_2d=model.config.uses_2d_positions,
                                     mask_token=getattr(special, mask))
            expected, _ = sequence_logprob(model, sample)
            assert score.logprob == pytest.approx(expected, abs=1e-4)
            assert score.tokens == len(cont)


def test_long_context_is_cut_from_the_left(tokenizer, tiny_model):
    model = tiny_model()
    prompt, choice = tokenizer.encode(" ".join(PROMPTS * 20)), tokenizer.encode("Paris")
    [[score]] = score_continuations(model, tokenizer.special, [(prompt, [choice])], mask_token=tokenizer.special.mask,
                                    max_len=64, batch_size=1)
    kept = prompt[-(64 - 1 - len(choice)):]
    expected, _ = sequence_logprob(model, layout_prompted(kept, choice, tokenizer.special, use_2d=True))
    assert score.logprob == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_accuracy_on_items_with_known_answers(tokenizer, tiny_model, tmp_path):
    model = tiny_model()
    special = tokenizer.special
    best, best_norm, worst = [], [], []
    for p, cs in zip(PROMPTS, CHOICES):
        lps = [sequence_logprob(model, layout_prompted(tokenizer.encode(p), tokenizer.encode(c), special, use_2d=True))[0]
               for c in cs]
        norm = [lp / len(tokenizer.encode(c)) for lp, c in zip(lps, cs)]
        best.append(max(range(len(cs)), key=lps.__getitem__))
        best_norm.append(max(range(len(cs)), key=norm.__getitem__))
        worst.append(min(range(len(cs)), key=lps.__getitem__))
    for labels, accuracy in ((best, 1.0), (worst, 0.0)):
        data = write_jsonl(tmp_path / "mc.jsonl", [{"inputs_pretokenized": p, "choices_pretokenized": cs, "label": y}
                                                   for p, cs, y in zip(PROMPTS, CHOICES, labels)])
        task = TaskConfig(name="mc", type="multiple_choice", data=data)
        result = evaluate_task(model, tokenizer, task, batch_size=2, log=lambda m: None)
        assert result["metrics"]["accuracy"] == accuracy
        expected_norm = sum(a == b for a, b in zip(best_norm, labels)) / len(labels)
        assert result["metrics"]["accuracy_norm"] == pytest.approx(expected_norm)
        assert result["items"] == 4


def test_perplexity_is_exp_of_mean_nll(tokenizer, tiny_model, tmp_path):
    model = tiny_model()
    text = "It was the best of times, it was the worst of times. 天下大势，分久必合。"
    tokens = tokenizer.encode(text)
    sample = layout_gmask(tokens, 0, tokenizer.special, use_2d=True)  # one window: [gMASK] [sop] text
    with torch.no_grad():
        direct_loss = float(model(torch.tensor([sample.input_ids]), torch.tensor([sample.position_ids]),
                                  torch.tensor([sample.block_position_ids]), None, torch.tensor([sample.prefix_mask]),
                                  labels=torch.tensor([sample.labels])).loss)
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": text}])
    task = TaskConfig(name="lm", type="language_modeling", data=data, metrics=["perplexity", "bits_per_byte"])
    result = evaluate_task(model, tokenizer, task, batch_size=4, log=lambda m: None)
    assert result["tokens"] == len(tokens)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(direct_loss), rel=1e-4)
    assert result["metrics"]["bits_per_byte"] == pytest.approx(
        direct_loss * len(tokens) / math.log(2) / len(text.encode("utf-8")), rel=1e-4)


def test_sliding_windows_score_every_token_once(tokenizer, tiny_model):
    model = tiny_model()
    docs = [tokenizer.encode(" ".join(PROMPTS * 3)), tokenizer.encode("short")]
    [(nll, n), (nll_short, n_short)] = window_nll(model, tokenizer.special, docs, max_len=24, stride=8, batch_size=3)
    assert (n, n_short) == (len(docs[0]), len(docs[1]))
    expected = 0.0
    for start in range(0, len(docs[0]), 8):  # each window: up to 23 tokens, the last <= 8 of them scored
        end = min(start + 8, len(docs[0]))
        ctx = max(0, end - 23)
        expected -= sequence_logprob(model, layout_gmask(docs[0][ctx:end], start - ctx, tokenizer.special, use_2d=True),
                                     drop_last=False)[0]
    assert nll == pytest.approx(expected, rel=1e-5)


def test_lambada_last_word_accuracy_uses_greedy_tokens(tokenizer, tiny_model, tmp_path):
    model = tiny_model()
    rows = [{"inputs_pretokenized": p, "targets_pretokenized": t}
            for p, t in zip(PROMPTS, [" Paris", "合久必分", " yes", "x"])]
    expected = []
    for r in rows:
        sample = layout_prompted(tokenizer.encode(r["inputs_pretokenized"]), tokenizer.encode(r["targets_pretokenized"]),
                                 tokenizer.special, use_2d=True, mask_token=tokenizer.special.gmask)
        expected.append(all(sequence_logprob(model, sample)[1]))
    # make one item right by construction: its target is the model's greedy first token
    special = tokenizer.special
    [[top]] = generate_spans(model, [SpanQuery([special.gmask], 0, True)], special, GenerationConfig(max_new_tokens=1))
    [[score]] = score_continuations(model, special, [([], [[top]])], mask_token=special.gmask, max_len=64, batch_size=1)
    assert score.greedy
    data = write_jsonl(tmp_path / "lambada.jsonl", rows)
    task = TaskConfig(name="lambada", type="language_modeling", data=data, mask="[gMASK]", metrics=["last_word_accuracy"])
    result = evaluate_task(model, tokenizer, task, batch_size=3, log=lambda m: None)
    assert result["metrics"]["last_word_accuracy"] == sum(expected) / len(expected)


def test_generation_exact_match_against_the_greedy_answer(tokenizer, tiny_model, tmp_path):
    model = tiny_model()
    special = tokenizer.special
    config = GenerationConfig(max_new_tokens=6)
    greedy = [tokenizer.decode(span).strip() for span in generate_spans(
        model, [SpanQuery(tokenizer.encode(p) + [special.mask], len(tokenizer.encode(p)), False) for p in PROMPTS],
        special, config, vocab_limit=len(tokenizer))]
    rows = [{"inputs_pretokenized": p, "targets_pretokenized": [g]} for p, g in zip(PROMPTS, greedy)]
    rows[0]["targets_pretokenized"] = ["something else entirely"]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    task = TaskConfig(name="gen", type="generation", data=data, generation=config)
    result = evaluate_task(model, tokenizer, task, batch_size=3, log=lambda m: None)
    assert result["metrics"]["exact_match"] == 0.75
    assert result["metrics"]["f1"] >= 0.75


def test_beam_generation_follows_the_generation_config(tokenizer, tiny_model):
    from glm.generation import beam_search

    from stages.eval.scoring import generate_answers

    model = tiny_model()
    special = tokenizer.special
    config = GenerationConfig(max_new_tokens=5, num_beams=3)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    spans = generate_answers(model, special, prompts, mask_token=special.gmask, max_len=64, config=config,
                             vocab_limit=len(tokenizer), batch_size=2)
    for prompt, span in zip(prompts, spans):
        assert span == beam_search(model, SpanQuery(prompt + [special.gmask], len(prompt), True), special, config,
                                   vocab_limit=len(tokenizer))

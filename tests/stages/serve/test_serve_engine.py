"""The continuous-batching engine computes what glm/'s generation computes; streamed text adds up."""

import threading

import pytest
import torch

from glm.config import padded_vocab_size, preset
from glm.generation import GenerationConfig, SpanQuery, Utf8Guard, beam_search, generate_spans, process_logits
from glm.model import GLMModel
from glm.schema import part_b_positions
from stages.serve.engine import DecodeEngine, EngineOverloaded, SpanRequest, wait_for
from stages.serve.textstream import TextStream


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()


def gmask_query(tokenizer, text: str) -> SpanQuery:
    ids = tokenizer.encode(text) + [tokenizer.special.gmask]
    return SpanQuery(ids, len(ids) - 1, True)


def queries(tokenizer) -> list[SpanQuery]:
    ids = tokenizer.encode("The quick brown fox")
    mask = SpanQuery(ids[:2] + [tokenizer.special.mask] + ids[2:], 2, False)
    return [gmask_query(tokenizer, "Hello"), mask, gmask_query(tokenizer, "话说天下大势，分久必合，合久必分。"),
            gmask_query(tokenizer, "First Citizen:\nBefore we proceed any further, hear me speak.")]


def run_concurrently(engine, items):
    """Submit every (query, config) at once from threads; returns final events in order."""
    results = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def worker(i, query, config):
        barrier.wait()
        results[i] = wait_for(engine, query, config, timeout=120)

    threads = [threading.Thread(target=worker, args=(i, q, c)) for i, (q, c) in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batched_greedy_equals_generate_spans(model, tokenizer):
    engine = DecodeEngine(model, tokenizer, max_batch_size=3)
    try:
        items = [(q, GenerationConfig(max_new_tokens=n)) for q, n in zip(queries(tokenizer), (12, 5, 20, 9))]
        events = run_concurrently(engine, items)
        for (q, config), event in zip(items, events):
            expected = generate_spans(model, [q], tokenizer.special, config, len(tokenizer),
                                      Utf8Guard.of(tokenizer))[0]
            assert event.tokens == expected
            assert event.text == tokenizer.decode(expected)
            assert event.finish_reason == ("length" if len(expected) == config.max_new_tokens else "stop")
        assert engine.stats["batch_rows"] > engine.stats["steps"]  # rows really shared steps
    finally:
        engine.close()


def test_seeded_sampling_and_beam_match_glm(model, tokenizer):
    engine = DecodeEngine(model, tokenizer, max_batch_size=4)
    try:
        q = queries(tokenizer)[2]
        sampled = GenerationConfig(max_new_tokens=15, do_sample=True, temperature=0.9, top_k=40, top_p=0.9,
                                   seed=7, no_repeat_ngram_size=2)
        beam = GenerationConfig(max_new_tokens=10, num_beams=3, length_penalty=0.8)
        events = run_concurrently(engine, [(q, sampled), (q, beam), (queries(tokenizer)[0], sampled)])
        utf8 = Utf8Guard.of(tokenizer)
        assert events[0].tokens == generate_spans(model, [q], tokenizer.special, sampled, len(tokenizer), utf8)[0]
        assert events[1].tokens == beam_search(model, q, tokenizer.special, beam, len(tokenizer), utf8)
    finally:
        engine.close()


def test_overload_is_refused_not_queued_forever(model, tokenizer):
    engine = DecodeEngine(model, tokenizer, max_batch_size=1, max_waiting=0)
    try:
        gate = threading.Event()
        first = engine.submit(SpanRequest(queries(tokenizer)[0], GenerationConfig(max_new_tokens=200, min_new_tokens=200),
                                          lambda e: e.done and gate.set()))
        while engine.load["running"] == 0:
            gate.wait(0.01)
        with pytest.raises(EngineOverloaded, match="max_waiting 0"):
            engine.submit(SpanRequest(queries(tokenizer)[1], GenerationConfig(), lambda e: None))
        engine.cancel(first)
        assert gate.wait(30)
    finally:
        engine.close()
    assert not engine.alive


def test_one_failing_row_leaves_the_others_decoding(model, tokenizer):
    """Settings that blow up (a seed beyond 64 bits at admission, a temperature that turns the
    probabilities into NaN mid-decode) fail their own request only; the rows decoded with them
    finish exactly as glm/ computes them."""
    engine = DecodeEngine(model, tokenizer, max_batch_size=5)
    try:
        good = [(q, GenerationConfig(max_new_tokens=12, min_new_tokens=12)) for q in queries(tokenizer)[:3]]
        bad = [(queries(tokenizer)[3], GenerationConfig(max_new_tokens=12, do_sample=True, seed=2**70)),
               (queries(tokenizer)[3], GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1e-300))]
        events = run_concurrently(engine, good + bad)
        for (q, config), event in zip(good, events):
            assert event.finish_reason == "length" and event.error is None
            assert event.tokens == generate_spans(model, [q], tokenizer.special, config, len(tokenizer),
                                      Utf8Guard.of(tokenizer))[0]
        for event in events[3:]:
            assert event.finish_reason == "error" and event.error.startswith("generation failed: ")
        assert engine.stats["failed"] == 2
        after = wait_for(engine, queries(tokenizer)[0], GenerationConfig(max_new_tokens=4), timeout=60)
        assert after.finish_reason in ("length", "stop") and engine.alive  # still serving
    finally:
        engine.close()


def test_beam_searches_do_not_hold_a_normal_request(model, tokenizer):
    """Beam searches advance one step per decode step beside the batch (at most
    max_beam_requests at once; more wait without blocking others): a normal 8-token request
    submitted behind three long beam searches finishes within a few decode steps of its own
    length, while the beam searches are still running. Counted in decode-loop iterations, not
    seconds."""
    engine = DecodeEngine(model, tokenizer, max_batch_size=4, max_beam_requests=2)
    beam = GenerationConfig(max_new_tokens=150, min_new_tokens=150, num_beams=4)
    beam_done = []
    try:
        beams = [engine.submit(SpanRequest(q, beam, lambda e: e.done and beam_done.append(e)))
                 for q in queries(tokenizer)[:3]]
        while engine.load["running"] < 2:
            threading.Event().wait(0.01)
        start = engine.stats["iterations"]
        normal = wait_for(engine, queries(tokenizer)[3], GenerationConfig(max_new_tokens=8, min_new_tokens=8),
                          timeout=300)
        took = engine.stats["iterations"] - start
        assert normal.finish_reason == "length" and len(normal.tokens) == 8
        assert took <= 8 + 3, f"a normal 8-token request took {took} decode steps behind beam searches"
        assert not beam_done, "a beam search finished before the normal request: it was not interleaved"
        assert engine.load["waiting"] == 1  # the third beam search waited, the normal request did not
        for b in beams:
            engine.cancel(b)
    finally:
        engine.close()


class FakeTokenizer:
    """Byte-level decode (UTF-8 split across tokens) to exercise TextStream's hold-back."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stop", [[], ["END"], ["。", "xyz"]])
def test_text_stream_deltas_add_up_and_respect_stops(stop):
    data = "héllo 世界。 wENd. END more".encode()
    stream = TextStream(FakeTokenizer(), stop)
    deltas = []
    for b in data:
        deltas.append(stream.add(b))
        assert "\ufffd" not in deltas[-1]
        if stream.stopped:
            break
    deltas.append(stream.finish())
    full = data.decode()
    cut = min([full.find(s) for s in stop if s in full], default=len(full))
    assert "".join(deltas) == stream.text == full[:cut]


def test_text_stream_with_the_real_tokenizer(tokenizer):
    text = "话说天下大势，分久必合。 Ünïcödé ☃ 🚀"
    stream = TextStream(tokenizer)
    ids = tokenizer.encode(text)
    pieces = [stream.add(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def collect(engine, query, config, logprobs=None):
    """Submit one request; returns (final event, every event) once it is done."""
    done, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        if event.done:
            done.set()

    engine.submit(SpanRequest(query, config, on_event, logprobs=logprobs))
    return done, events


def test_a_seeded_row_samples_the_same_inside_a_batch_with_other_rows(model, tokenizer):
    """Each row has its own generator and settings: a seeded request with penalties, bias and
    min-p gives the same tokens alone, beside other sampled rows, and as glm/ computes it."""
    q = queries(tokenizer)
    seeded = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.95,
                              min_p=0.05, seed=5, presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.2,
                              logit_bias={tokenizer.encode("the")[0]: 2.0})
    other = GenerationConfig(max_new_tokens=20, min_new_tokens=20, do_sample=True, temperature=1.0, seed=9,
                             frequency_penalty=-1.0)
    engine = DecodeEngine(model, tokenizer, max_batch_size=4)
    try:
        alone = wait_for(engine, q[2], seeded, timeout=120)
        batched = run_concurrently(engine, [(q[0], other), (q[2], seeded), (q[3], other)])
        assert engine.stats["batch_rows"] > engine.stats["steps"]  # rows really shared steps
    finally:
        engine.close()
    assert batched[1].tokens == alone.tokens == generate_spans(model, [q[2]], tokenizer.special, seeded,
                                                                len(tokenizer), Utf8Guard.of(tokenizer))[0]
    assert len(alone.tokens) == 16 and len(batched[0].tokens) == len(batched[2].tokens) == 20


def reference_logprobs(model, tokenizer, query, tokens, config):
    """log_softmax of glm's processed logits at each generated position, from one full forward pass."""
    special = tokenizer.special
    n = len(query.part_a)
    ids = query.part_a + [special.sop] + tokens[:-1]
    part_b, block = part_b_positions(query.mask_index, n, len(tokens), is_gmask=query.is_gmask,
                                     use_2d=model.config.uses_2d_positions)
    pos, block = list(range(n)) + part_b, [0] * n + block
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.tensor([pos]), torch.tensor([block]),
                    torch.ones(1, len(ids), dtype=torch.long), torch.tensor([[1] * n + [0] * len(tokens)]))
    rows = []
    for j in range(len(tokens)):
        history = query.part_a + [special.sop] + tokens[:j]
        logits = process_logits(out.logits[0, n + j:n + j + 1].float(), [history], j, [special.eop, special.eos],
                                config, len(tokenizer), Utf8Guard.of(tokenizer))
        rows.append(torch.log_softmax(logits[0], -1))
    return rows


def test_logprobs_are_of_the_penalised_distribution_and_stream_with_their_tokens(model, tokenizer):
    q = queries(tokenizer)[3]
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12, presence_penalty=1.5, frequency_penalty=0.5,
                              repetition_penalty=1.3, logit_bias={tokenizer.encode("a")[0]: 3.0})
    engine = DecodeEngine(model, tokenizer, max_batch_size=2)
    try:
        done, events = collect(engine, q, config, logprobs=3)
        other, _ = collect(engine, queries(tokenizer)[0], GenerationConfig(max_new_tokens=5))
        assert done.wait(120) and other.wait(120)
    finally:
        engine.close()
    final = events[-1]
    streamed = [lp for e in events for lp in e.logprobs]
    assert [lp.token for lp in streamed] == final.tokens and len(final.tokens) == 12
    assert all(e.logprobs for e in events[:-1])  # every delta carries the logprobs of its tokens
    for lp, expected in zip(streamed, reference_logprobs(model, tokenizer, q, final.tokens, config)):
        assert lp.logprob == pytest.approx(expected[lp.token].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()
        assert lp.top[0] == (lp.token, lp.logprob)  # greedy: the chosen token is the most likely one


class Timings:
    def __init__(self):
        self.first, self.next = [], []

    def first_token(self, seconds):
        self.first.append(seconds)

    def next_token(self, seconds):
        self.next.append(seconds)


def test_the_observer_hears_every_token_and_the_rate_counts_them(model, tokenizer):
    timings = Timings()
    engine = DecodeEngine(model, tokenizer, max_batch_size=2, observer=timings)
    try:
        events = run_concurrently(engine, [(q, GenerationConfig(max_new_tokens=6, min_new_tokens=6))
                                           for q in queries(tokenizer)[:2]])
        assert engine.tokens_per_s() > 0
    finally:
        engine.close()
    assert all(len(e.tokens) == 6 for e in events)
    assert len(timings.first) == 2 and len(timings.next) == 10
    assert all(s >= 0 for s in timings.first + timings.next)

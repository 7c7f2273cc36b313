"""Continuous batching over glm/'s model and sampling: one decode loop, requests join between steps.

A background thread owns the model. Each step it (1) prefills the requests that arrived since
the last step (left-padded together, like `glm.generation.generate_spans`) and merges their KV
caches into the running batch, left-padding the shorter cache with invisible segment-0
columns; (2) picks every row's next token with `glm.generation.process_logits` and
`sample_next` under that row's own GenerationConfig and seeded generator; (3) drops finished
rows and runs one cached forward step for the rest. A request alone in the batch computes
exactly what `generate_spans` computes for it, so greedy and seeded outputs match glm/.

Beam search (num_beams > 1) keeps its own beams-as-batch cache: such requests advance by
beam steps (`glm.generation.beam_search_steps`, one forward pass each) beside the batch: one
beam search per decode step, in turn, while rows are decoding; every one of them each step
when none are. At most `max_beam_requests` run at once (more wait, without holding up the
requests behind them). So a normal request's latency grows by one beam forward pass per
token, never by whole beam searches.

Per-row logprobs (`SpanRequest.logprobs`) are those of the distribution each token was drawn
from after penalties and logit bias (and the grammar mask), before temperature and top-k /
top-p / min-p truncation: `log_softmax` of what `process_logits` returns. An `EngineObserver`
hears each token's timing (the serve metrics), and `tokens_per_s` gives the recent generation
rate.

Structured output (`SpanRequest.grammar`, `stages.serve.structured`): a constrained row's
logits are masked to the tokens its grammar allows after `process_logits` (penalties, bias,
bans) and before sampling; the row ends with 'stop' as soon as its document is complete.
Rows without a grammar do nothing more.

Failures are per request: a row whose sampling, text decoding or admission fails (or a beam
search that fails) ends with an error event and every other row keeps decoding. Only a failure
of the shared forward pass fails the rows decoded with it.

This module uses torch and glm/ only (no Ray), so it also runs in-process (benchmarks, tests).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from glm.generation import (GenerationConfig, PartBBatch, SpanQuery, Utf8Guard, beam_search_steps, process_logits,
                            sample_next)
from glm.model import GLMModel, KVCache, concat_caches, left_pad, model_device, select_cache
from glm.schema import part_b_positions
from glm.tokenizer import GLMTokenizer
from stages.serve.textstream import TextStream

if TYPE_CHECKING:
    from stages.serve.structured import GrammarMatcher


RATE_WINDOW_S = 10.0
"""`DecodeEngine.tokens_per_s` counts the tokens of this many seconds."""
LOGPROB_FLOOR = -9999.0
"""Reported for a token the processed distribution excludes (OpenAI's value for "very unlikely")."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the caller should answer 429 and the client retry later."""


class EngineStopped(RuntimeError):
    """The engine was closed (the replica is shutting down)."""


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its step."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """(token id, log-probability) of the `SpanRequest.logprobs` most likely tokens, best first."""


@dataclass
class SpanEvent:
    """What a request hears from the engine: text deltas, then one final event."""

    delta: str = ""
    """New text safe to show (may be empty on the final event)."""
    done: bool = False
    finish_reason: str | None = None
    """'stop' (stop token or stop string), 'length' (max_new_tokens), 'cancelled' or 'error'."""
    tokens: list[int] = field(default_factory=list)
    """On the final event: every generated token id (up to the stop; stop tokens excluded)."""
    text: str = ""
    """On the final event: the whole generated text (the deltas concatenated)."""
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """When the request asked for logprobs: those of the tokens generated since the previous
    event (like `delta`; a token whose text is held back comes with the next event)."""


@dataclass
class SpanRequest:
    """One span to generate and where its events go (called from the engine thread)."""

    query: SpanQuery
    config: GenerationConfig
    on_event: Callable[[SpanEvent], None]
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends before the first occurrence, which is not returned."""
    logprobs: int | None = None
    """Report each token's logprob and this many top alternatives (None: no logprobs; not
    available with beam search)."""
    grammar: "GrammarMatcher | None" = None
    """Structured output: only tokens this matcher allows are generated, and the span ends
    when its document is complete (None: unconstrained; not available with beam search)."""
    queued_at: float = field(default_factory=time.monotonic)
    """When the request was made (time to first token counts from here)."""
    cancelled: bool = False
    done: bool = False
    """Set when the final event was sent."""


class _Row:
    """Decoding state of one running request."""

    def __init__(self, request: SpanRequest, tokenizer: GLMTokenizer, stop_ids: list[int], device):
        self.request = request
        self.config = request.config
        self.stop_ids = stop_ids
        self.history = request.query.part_a + [tokenizer.special.sop]
        self.generated: list[int] = []
        self.text = TextStream(tokenizer, request.stop)
        self.logprobs: list[TokenLogprob] = []
        """Logprobs of tokens not yet sent with an event."""
        self.last_token_at: float | None = None
        self.generator = None
        if self.config.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.config.seed if self.config.seed is not None else torch.seed())

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs not yet sent (for the next event)."""
        taken, self.logprobs = self.logprobs, []
        return taken


class _Beam:
    """A running beam search: its generator (one forward step per `next`) and its text."""

    def __init__(self, engine: "DecodeEngine", request: SpanRequest):
        if request.logprobs is not None:
            raise ValueError("logprobs are not available with beam search (it scores hypotheses, not tokens)")
        if request.grammar is not None:
            raise ValueError("structured output is not available with beam search")
        stop_ids = sorted({*engine._base_stop_ids, *request.config.stop_token_ids})
        self.row = _Row(request, engine.tokenizer, stop_ids, engine.device)
        self.steps = beam_search_steps(engine.model, request.query, engine.tokenizer.special, request.config,
                                       engine.vocab_limit, engine.utf8)


class EngineObserver:
    """Token timing, called on the engine thread (`stages.serve.metrics` records it; this base
    class ignores it)."""

    def first_token(self, seconds: float) -> None:
        """A request's first token, `seconds` after the request was made."""

    def next_token(self, seconds: float) -> None:
        """A later token, `seconds` after the previous token of the same request."""


def _token_logprob(scores: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability in `scores` (V,) and the k most likely tokens', floored at LOGPROB_FLOOR."""
    values, ids = scores[token:token + 1], []
    if k:
        top = torch.topk(scores, min(k, scores.shape[-1]))
        values, ids = torch.cat((values, top.values)), top.indices.tolist()
    chosen, *rest = [max(v, LOGPROB_FLOOR) for v in values.tolist()]
    return TokenLogprob(token, chosen, list(zip(ids, rest)))


class DecodeEngine:
    """Continuous-batching generation of Part-B spans for one model (thread-safe `submit`)."""

    def __init__(self, model: GLMModel, tokenizer: GLMTokenizer, max_batch_size: int = 8, max_waiting: int = 64,
                 max_beam_requests: int = 2, observer: EngineObserver | None = None):
        if max_batch_size < 1 or max_waiting < 0 or max_beam_requests < 1:
            raise ValueError(f"max_batch_size and max_beam_requests must be >= 1 and max_waiting >= 0, got "
                             f"{max_batch_size}, {max_beam_requests}, {max_waiting}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting, self.max_beam_requests = max_batch_size, max_waiting, max_beam_requests
        self.device = model_device(model)
        self.use_2d = model.config.uses_2d_positions
        self.vocab_limit = len(tokenizer)
        self.utf8 = Utf8Guard.of(tokenizer)  # replies are valid UTF-8 text, never a broken character
        special = tokenizer.special
        self._base_stop_ids = [special.eop, special.eos]
        self._waiting: collections.deque[SpanRequest] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._beams: list[_Beam] = []
        self._beam_turn = 0
        self._cache: KVCache | None = None
        self._segment_ids = self._prefix_mask = self._logits = None
        self.stats = collections.Counter()  # iterations, steps, beam_steps, tokens, batch_rows, prefills, failed
        self.observer = observer or EngineObserver()
        self._started = time.monotonic()
        self._recent_tokens: collections.deque[list] = collections.deque()  # [time, tokens] per step, RATE_WINDOW_S
        self._thread = threading.Thread(target=self._loop, name="glm-decode-loop", daemon=True)
        self._thread.start()

    # --- API (any thread) -----------------------------------------------------------------

    def submit(self, request: SpanRequest) -> SpanRequest:
        """Queue a request; raises EngineOverloaded when `max_waiting` requests already wait."""
        with self._wake:
            if self._closed:
                raise EngineStopped("the generation engine is shut down")
            if len(self._waiting) >= self.max_waiting + max(0, self.max_batch_size - len(self._rows)):
                raise EngineOverloaded(
                    f"server overloaded: {len(self._waiting)} requests waiting and {len(self._rows)} running "
                    f"(max_batch_size {self.max_batch_size}, max_waiting {self.max_waiting}); retry later"
                )
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: SpanRequest) -> None:
        """Stop generating for `request` (e.g. its client went away); it ends with 'cancelled'."""
        request.cancelled = True

    @property
    def capacity(self) -> int:
        """Most requests the engine holds at once (running + waiting) when otherwise idle."""
        return self.max_batch_size + self.max_waiting

    @property
    def load(self) -> dict[str, int]:
        """Requests running and waiting now, and tokens generated since start."""
        return {"running": len(self._rows) + len(self._beams), "waiting": len(self._waiting),
                "tokens_generated": self.stats["tokens"]}

    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds (since start when shorter)."""
        now = time.monotonic()
        window = min(RATE_WINDOW_S, now - self._started)
        recent = sum(n for t, n in list(self._recent_tokens) if t >= now - window)
        return recent / window if window > 0 else 0.0

    @property
    def alive(self) -> bool:
        """Whether the decode loop is running (it only ends through `close`)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the loop; pending and running requests end with an error event."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # --- the decode loop (engine thread) -------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows and not self._beams:
                    self._wake.wait()
                if self._closed:
                    break
                new = self._take_waiting()
            try:
                self._step(new)
            except Exception as e:  # a bug or OOM in the shared forward pass: fail what it touched, keep serving
                affected = new + [row.request for row in self._rows] + [b.row.request for b in self._beams]
                for request in affected:
                    self._fail(request, e)
                self._rows, self._beams, self._cache = [], [], None
        for request in list(self._waiting) + [r.request for r in self._rows] + [b.row.request for b in self._beams]:
            self._emit(request, SpanEvent(done=True, finish_reason="error", error="the server is shutting down"))

    def _take_waiting(self) -> list[SpanRequest]:
        """Waiting requests that fit now: rows up to max_batch_size, beam searches up to
        max_beam_requests; a request that does not fit keeps its place without blocking others."""
        room = self.max_batch_size - len(self._rows)
        beam_room = self.max_beam_requests - len(self._beams)
        new, kept = [], collections.deque()
        while self._waiting:
            request = self._waiting.popleft()
            if request.config.num_beams > 1 and beam_room > 0:
                beam_room -= 1
                new.append(request)
            elif request.config.num_beams == 1 and room > 0:
                room -= 1
                new.append(request)
            else:
                kept.append(request)
        self._waiting = kept
        return new

    @staticmethod
    def _emit(request: SpanRequest, event: SpanEvent) -> None:
        """Send an event (once a request is done, nothing more); a failing listener never stops the loop."""
        if request.done:
            return
        request.done = event.done
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - e.g. the client's event loop is gone
            request.cancelled = True

    def _fail(self, request: SpanRequest, error: BaseException) -> None:
        """End one request with an error event (the others are not affected)."""
        if not request.done:
            self.stats["failed"] += 1
        self._emit(request, SpanEvent(done=True, finish_reason="error",
                                      error=f"generation failed: {type(error).__name__}: {error}"))

    @torch.no_grad()
    def _step(self, new: list[SpanRequest]) -> None:
        self.stats["iterations"] += 1
        live = [r for r in new if not r.cancelled]
        for r in new:
            if r.cancelled:
                self._emit(r, SpanEvent(done=True, finish_reason="cancelled"))
        for request in live:
            if request.config.num_beams > 1:
                try:
                    self._beams.append(_Beam(self, request))
                except Exception as e:  # noqa: BLE001 - e.g. a bad setting: this request only
                    self._fail(request, e)
        self._admit_each([r for r in live if r.config.num_beams == 1])
        if self._rows:
            self._decode_rows()
        self._advance_beams()

    def _decode_rows(self) -> None:
        """Pick and record every row's next token (each row on its own: a failure ends that row
        only), then run one forward step for the rows still going."""
        picks, picked, scores = [], [], {}  # each row under its own settings; one device sync for the step
                                            # (plus one per row that asks for logprobs)
        for i, row in enumerate(self._rows):
            try:
                logits = process_logits(self._logits[i:i + 1], [row.history], len(row.generated), row.stop_ids,
                                        row.config, self.vocab_limit, self.utf8)
                if row.request.grammar is not None:
                    row.request.grammar.mask(logits)
                if row.request.logprobs is not None:
                    scores[i] = torch.log_softmax(logits[0], dim=-1)  # before temperature and truncation
                picks.append(sample_next(logits, row.config, row.generator))
                picked.append(i)
            except Exception as e:  # noqa: BLE001 - numeric trouble in one row's settings
                self._fail(row.request, e)
        keep, next_tokens = [], []
        tokens = torch.cat(picks).tolist() if picks else []
        now = time.monotonic()
        for i, token in zip(picked, tokens):
            row = self._rows[i]
            try:
                going = self._advance(row, token, scores.get(i), now)
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer error decoding this row's text
                self._fail(row.request, e)
                going = False
            if going:
                keep.append(i)
                next_tokens.append(token)
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(self._rows)
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            if not self._rows:
                self._cache = None
                return
            self._select(keep)
        self._decode(next_tokens)

    def _advance_beams(self) -> None:
        """One step of every running beam search; while rows are decoding, one step of one beam
        search in turn (each costs a forward pass of num_beams rows, which every row waits for)."""
        if not self._beams:
            return
        turn = self._beams
        if self._rows:
            self._beam_turn = (self._beam_turn + 1) % len(self._beams)
            turn = [self._beams[self._beam_turn]]
        going = []
        for beam in self._beams:
            request = beam.row.request
            if beam not in turn and not request.cancelled:
                going.append(beam)
                continue
            if request.cancelled:
                beam.steps.close()
                self._finish(beam.row, "cancelled")
                continue
            try:
                next(beam.steps)
                self.stats["beam_steps"] += 1
                going.append(beam)
            except StopIteration as result:
                self._finish_beam(beam.row, result.value)
            except Exception as e:  # noqa: BLE001 - this beam search only
                self._fail(request, e)
        self._beams = going

    def _advance(self, row: _Row, token: int, scores: torch.Tensor | None, now: float) -> bool:
        """Record a token sampled at time `now` (with the log-probabilities it was drawn from when
        the request wants logprobs); emits events. False when the row is finished."""
        request = row.request
        if request.cancelled:
            self._finish(row, "cancelled")
            return False
        if token in row.stop_ids:
            self._finish(row, "stop")
            return False
        if request.grammar is not None:
            request.grammar.consume(token)
        row.generated.append(token)
        row.history.append(token)
        if scores is not None:
            row.logprobs.append(_token_logprob(scores, token, request.logprobs))
        self._count_tokens(1, now)
        if row.last_token_at is None:
            self.observer.first_token(now - request.queued_at)
        else:
            self.observer.next_token(now - row.last_token_at)
        row.last_token_at = now
        delta = row.text.add(token)
        if row.text.stopped or (request.grammar is not None and request.grammar.complete):
            self._finish(row, "stop", delta)
            return False
        if len(row.generated) >= row.config.max_new_tokens:
            self._finish(row, "length", delta)
            return False
        if delta:
            self._emit(request, SpanEvent(delta=delta, logprobs=row.take_logprobs()))
        return True

    def _count_tokens(self, n: int, now: float) -> None:
        """Count `n` tokens generated at `now` (stats and the tokens_per_s window)."""
        self.stats["tokens"] += n
        recent = self._recent_tokens
        if recent and recent[-1][0] == now:
            recent[-1][1] += n
        else:
            recent.append([now, n])
        while recent[0][0] < now - RATE_WINDOW_S:
            recent.popleft()

    def _finish(self, row: _Row, reason: str, delta: str = "") -> None:
        delta += row.text.finish()
        self._emit(row.request, SpanEvent(delta=delta, done=True, finish_reason=reason, tokens=list(row.generated),
                                          text=row.text.text, logprobs=row.take_logprobs()))

    def _finish_beam(self, row: _Row, tokens: list[int]) -> None:
        """A finished beam search: its best hypothesis, cut at a stop string."""
        delta = ""
        for token in tokens:
            row.generated.append(token)
            delta += row.text.add(token)
            if row.text.stopped:
                break
        now = time.monotonic()
        if row.generated:  # the client sees the first token now, with the others
            self._count_tokens(len(row.generated), now)
            self.observer.first_token(now - row.request.queued_at)
        finished_by_length = len(tokens) >= row.config.max_new_tokens and not row.text.stopped
        self._finish(row, "length" if finished_by_length else "stop", delta)

    def _admit_each(self, requests: list[SpanRequest]) -> None:
        """Admit new requests together; when that fails, one by one, so that only the request
        that cannot be admitted fails."""
        if not requests:
            return
        try:
            self._admit(requests)
        except Exception as e:  # noqa: BLE001
            if len(requests) == 1:
                self._fail(requests[0], e)
                return
            for request in requests:
                try:
                    self._admit([request])
                except Exception as e1:  # noqa: BLE001
                    self._fail(request, e1)

    def _admit(self, requests: list[SpanRequest]) -> None:
        """Prefill new requests together and merge them into the running batch (all state is
        assigned at the end, so a failure leaves the running batch as it was)."""
        self.stats["prefills"] += 1
        special = self.tokenizer.special
        batch = PartBBatch([r.query for r in requests], special, self.use_2d, self.device)
        out = self.model(batch.input_ids, batch.position_ids, batch.block_position_ids, batch.segment_ids,
                         batch.prefix_mask, use_cache=True)
        rows = [_Row(r, self.tokenizer, sorted({*self._base_stop_ids, *r.config.stop_token_ids}), self.device)
                for r in requests]
        logits = out.logits[:, -1].float()
        if self._cache is None:
            self._rows, self._cache = rows, out.past_key_values
            self._segment_ids, self._prefix_mask, self._logits = batch.segment_ids, batch.prefix_mask, logits
            return
        T = max(self._segment_ids.shape[1], batch.segment_ids.shape[1])
        cache = concat_caches(self._cache, out.past_key_values, T)  # padded columns are segment 0: invisible
        segment_ids = torch.cat((left_pad(self._segment_ids, T, 1), left_pad(batch.segment_ids, T, 1)))
        prefix_mask = torch.cat((left_pad(self._prefix_mask, T, 1), left_pad(batch.prefix_mask, T, 1)))
        logits = torch.cat((self._logits, logits))
        self._cache, self._segment_ids, self._prefix_mask, self._logits = cache, segment_ids, prefix_mask, logits
        self._rows += rows

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows `keep` and drop cache columns that are padding in every kept row."""
        index = torch.tensor(keep, device=self.device)
        segment_ids = self._segment_ids.index_select(0, index)
        first = int((segment_ids != 0).any(0).int().argmax())
        self._segment_ids = segment_ids[:, first:]
        self._prefix_mask = self._prefix_mask.index_select(0, index)[:, first:]
        self._cache = select_cache(self._cache, index, first)

    def _decode(self, tokens: list[int]) -> None:
        """One cached forward step of every running row with its newly generated token."""
        positions = [
            part_b_positions(r.request.query.mask_index, len(r.request.query.part_a), 1,
                             is_gmask=r.request.query.is_gmask, use_2d=self.use_2d, start=len(r.generated))
            for r in self._rows
        ]
        pos = torch.tensor([p[0][0] for p in positions], device=self.device)[:, None]
        block = torch.tensor([p[1][0] for p in positions], device=self.device)[:, None]
        ones = torch.ones(len(self._rows), 1, dtype=self._segment_ids.dtype, device=self.device)
        self._segment_ids = torch.cat((self._segment_ids, ones), dim=1)
        self._prefix_mask = torch.cat((self._prefix_mask, torch.zeros_like(ones)), dim=1)
        out = self.model(torch.tensor(tokens, device=self.device)[:, None], pos, block, self._segment_ids,
                         self._prefix_mask, past_key_values=self._cache, use_cache=True)
        self._cache, self._logits = out.past_key_values, out.logits[:, -1].float()


def wait_for(engine: DecodeEngine, query: SpanQuery, config: GenerationConfig, stop: list[str] | None = None,
             timeout: float | None = None, grammar: "GrammarMatcher | None" = None) -> SpanEvent:
    """Run one request to completion from a plain thread; returns its final event."""
    done = threading.Event()
    final: list[SpanEvent] = []

    def on_event(event: SpanEvent) -> None:
        if event.done:
            final.append(event)
            done.set()

    request = engine.submit(SpanRequest(query, config, on_event, stop or [], grammar=grammar))
    if not done.wait(timeout):
        engine.cancel(request)
        raise TimeoutError(f"generation did not finish within {timeout}s")
    return final[0]

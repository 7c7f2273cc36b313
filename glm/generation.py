"""Generation for GLM: greedy, sampling, beam search, blank filling and the ChatGLM prompt.

Everything GLM generates is a Part-B span: Part A (the text, with the mask being filled) is
bidirectional context, then [sop] and generated tokens follow causally, positioned by
`glm.schema.part_b_positions`. Batches are left-padded (padding is segment 0, so it is
invisible to real tokens) and decoded with the KV cache.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch

from glm.chat_format import ChatFormat, Message, chat_format as get_chat_format
from glm.chat_format import build_chat_prompt  # noqa: F401 - re-exported (the ChatGLM-6B prompt)
from glm.model import GLMModel, KVCache, model_device, select_cache
from glm.schema import SpecialTokens, part_b_positions
from glm.tokenizer import GLMTokenizer


@dataclass
class GenerationConfig:
    """Decoding settings (defaults: greedy, up to 256 new tokens)."""

    max_new_tokens: int = 256
    """Most tokens generated for one span (a stop token ends it earlier)."""
    do_sample: bool = False
    """Sample instead of taking the arg-max."""
    temperature: float = 1.0
    """Divides the logits before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set with this much probability (1.0 = off)."""
    num_beams: int = 1
    """Beam search with this many beams when > 1."""
    length_penalty: float = 1.0
    """Beam score = log-prob / ((5 + len) / 6) ** length_penalty."""
    no_repeat_ngram_size: int = 0
    """Never produce an n-gram already in the sequence (0 = off)."""
    min_new_tokens: int = 0
    """Stop tokens are blocked until this many tokens were generated."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop tokens beside [eop] and end-of-text."""
    seed: int | None = None
    """Seed of the sampling RNG (None: nondeterministic)."""
    repetition_penalty: float = 1.0
    """CTRL / Hugging Face form: the logit of every token already in the sequence (Part A and
    the span so far) is divided by this when positive, multiplied when negative (1.0 = off)."""
    presence_penalty: float = 0.0
    """OpenAI form: subtracted once from the logit of every token generated so far in the span."""
    frequency_penalty: float = 0.0
    """OpenAI form: subtracted from a token's logit once per time it was generated so far."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit at every step."""
    min_p: float = 0.0
    """Sampling keeps only tokens whose probability is at least min_p x the most likely one's
    (after temperature, top-k and top-p; 0 = off)."""
    prefix_choices: list[list[int]] = field(default_factory=list)
    """The span starts with one of these token sequences: while the span so far is a proper
    prefix of some of them, only their next tokens can follow (the model picks where they
    differ). A forced tool-call header (`glm.chat_format`); empty = off."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.num_beams < 1 or self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError("top_k, no_repeat_ngram_size, min_new_tokens must be >= 0 and num_beams >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported: set do_sample=False or num_beams=1")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        penalties = [self.presence_penalty, self.frequency_penalty, *self.logit_bias.values()]
        if not all(math.isfinite(v) for v in penalties):
            raise ValueError("presence_penalty, frequency_penalty and logit_bias values must be finite")


# ChatGLM's chat decoding (nucleus sampling, top_p 0.7, temperature 0.95) with a repetition
# guard: no 3-gram twice, so a weak model cannot answer with one token over and over.
CHAT_DEFAULTS = {"do_sample": True, "temperature": 0.95, "top_p": 0.7, "no_repeat_ngram_size": 3}


def chat_generation_config(max_new_tokens: int = 256, **overrides) -> GenerationConfig:
    """GenerationConfig with ChatGLM's chat defaults (`CHAT_DEFAULTS`), fields replaced by `overrides`."""
    return GenerationConfig(max_new_tokens=max_new_tokens, **{**CHAT_DEFAULTS, **overrides})


@dataclass
class SpanQuery:
    """Generate the span of one mask: Part A token ids and the index of the mask in it."""

    part_a: list[int]
    mask_index: int
    is_gmask: bool


# --- logits processing -------------------------------------------------------------------


def banned_ngram_tokens(tokens: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `tokens`."""
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}


class Utf8Guard:
    """Keeps generated text valid UTF-8 on a byte-fallback vocabulary. A character the pieces do
    not cover is spelled as byte pieces (`<0xE4><0xBD><0xA0>`); a weak model can emit a lead
    byte and then something else, or a continuation byte on its own, which decodes to U+FFFD.
    While the span's last character is open, only the byte pieces that can continue it may
    follow (no stop token, no other piece); between characters, no byte piece that cannot start
    one (a continuation byte, 0xC0, 0xC1, 0xF5-0xFF). A span cut by max_new_tokens can still end
    inside a character."""

    def __init__(self, byte_pieces: dict[int, int]):
        self.byte_of = dict(byte_pieces)
        self._id_of = {b: i for i, b in self.byte_of.items()}
        self.never_first = sorted(i for i, b in self.byte_of.items() if not self._valid(bytes([b])))

    @classmethod
    def of(cls, tokenizer: GLMTokenizer) -> "Utf8Guard | None":
        """The guard for a tokenizer's byte pieces (None: it has none, nothing to guard)."""
        return cls(tokenizer.byte_pieces) if tokenizer.byte_pieces else None

    @staticmethod
    def _valid(prefix: bytes) -> bool:
        """Whether `prefix` starts valid UTF-8 (complete or not)."""
        try:
            codecs.getincrementaldecoder("utf-8")().decode(prefix, final=False)
            return True
        except UnicodeDecodeError:
            return False

    def open_character(self, span: list[int]) -> bytes:
        """The bytes of the span's last character while it is incomplete (b"" when it is not)."""
        tail = []
        for token in reversed(span[-3:]):
            value = self.byte_of.get(token)
            if value is None:
                break
            tail.append(value)
            if value & 0xC0 != 0x80:  # a character's first byte
                break
        tail.reverse()
        if not tail or tail[0] & 0xC0 == 0x80:
            return b""
        need = 2 if tail[0] >= 0xC0 else 1
        need += tail[0] >= 0xE0
        need += tail[0] >= 0xF0
        return bytes(tail) if len(tail) < need else b""

    @functools.lru_cache(maxsize=4096)
    def continuations(self, prefix: bytes) -> list[int]:
        """Ids of the byte pieces that can follow the open character `prefix`."""
        return [self._id_of[b] for b in range(0x80, 0xC0) if b in self._id_of and self._valid(prefix + bytes([b]))]

    def mask(self, logits: torch.Tensor, histories: list[list[int]], generated: int) -> None:
        """Ban, in place on (B, V) logits, every token that would make a row's span invalid UTF-8."""
        neg = torch.finfo(logits.dtype).min
        for row, history in enumerate(histories):
            prefix = self.open_character(history[len(history) - generated:] if generated else [])
            if prefix:  # a continuation another ban removed stays possible: the character must end
                allowed = self.continuations(prefix)
                keep = logits[row, allowed].clone()
                logits[row] = neg
                logits[row, allowed] = torch.where(keep > neg, keep, torch.zeros_like(keep))
            elif self.never_first:
                logits[row, self.never_first] = neg


def process_logits(
    logits: torch.Tensor, histories: list[list[int]], generated: int, stop_ids: list[int],
    config: GenerationConfig, vocab_limit: int | None, utf8: Utf8Guard | None = None,
) -> torch.Tensor:
    """The distribution the next token is drawn from, on (B, V) fp32 logits, in place: first the
    penalties and the logit bias (`apply_penalties`), then the bans (vocabulary limit, minimum
    length, no-repeat n-grams, invalid UTF-8 with a `utf8` guard) set logits to the most
    negative float. `histories[b]` is row b's whole sequence (Part A, [sop], the span so far),
    whose last `generated` tokens are the span."""
    apply_penalties(logits, histories, generated, config)
    neg = torch.finfo(logits.dtype).min
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = neg  # padded embedding rows are never real tokens
    if generated < config.min_new_tokens:
        logits[:, stop_ids] = neg
    if config.no_repeat_ngram_size:
        for row, history in enumerate(histories):
            banned = banned_ngram_tokens(history, config.no_repeat_ngram_size)
            if banned:
                logits[row, list(banned)] = neg
    if utf8 is not None:
        utf8.mask(logits, histories, generated)
    if config.prefix_choices:
        force_prefix(logits, histories, generated, config.prefix_choices)
    return logits


def force_prefix(logits: torch.Tensor, histories: list[list[int]], generated: int, choices: list[list[int]]) -> None:
    """Keep only the tokens that continue one of `choices` (see GenerationConfig.prefix_choices),
    in place; a forced token some ban removed still stays possible."""
    neg = torch.finfo(logits.dtype).min
    for row, history in enumerate(histories):
        span = history[len(history) - generated:] if generated else []
        if any(c == span for c in choices):
            continue
        allowed = sorted({c[generated] for c in choices if len(c) > generated and c[:generated] == span})
        if not allowed:
            continue
        keep = logits[row, allowed]
        logits[row] = neg
        logits[row, allowed] = torch.where(keep > neg, keep, torch.zeros_like(keep))


def apply_penalties(logits: torch.Tensor, histories: list[list[int]], generated: int,
                    config: GenerationConfig) -> torch.Tensor:
    """Repetition penalty (over the whole sequence), presence and frequency penalties (over the
    `generated` span tokens), then the logit bias, on (B, V) logits in place. With c[t] the
    times token t was generated: logit[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0)."""
    penalised = config.repetition_penalty != 1.0 or config.presence_penalty or config.frequency_penalty
    device = logits.device
    for row, history in enumerate(histories if penalised else []):
        if config.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), device=device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / config.repetition_penalty,
                                            values * config.repetition_penalty)
        if (config.presence_penalty or config.frequency_penalty) and generated:
            span = torch.tensor(history[len(history) - generated:], device=device)
            counts = torch.bincount(span, minlength=logits.shape[-1]).to(logits.dtype)
            logits[row] -= config.frequency_penalty * counts + config.presence_penalty * (counts > 0)
    if config.logit_bias:
        ids = torch.tensor(list(config.logit_bias), device=device)
        logits[:, ids] += torch.tensor(list(config.logit_bias.values()), dtype=logits.dtype, device=device)
    return logits


def sample_next(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick next tokens (B,) from processed (B, V) fp32 logits: temperature, top-k, top-p, min-p."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    neg = torch.finfo(logits.dtype).min
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= config.top_p  # keep the first token always
        logits = logits.masked_fill(drop.scatter(-1, order, drop), neg)
    probs = torch.softmax(logits, dim=-1)
    if config.min_p > 0:
        probs = probs.masked_fill(probs < config.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- decoding ----------------------------------------------------------------------------


class PartBBatch:
    """Left-padded context tensors and the per-row rule for the next Part-B position."""

    def __init__(self, queries: list[SpanQuery], special: SpecialTokens, use_2d: bool, device):
        self.queries, self.use_2d = queries, use_2d
        contexts = [q.part_a + [special.sop] for q in queries]
        L = max(len(c) for c in contexts)
        B = len(queries)
        self.input_ids = torch.full((B, L), special.pad, dtype=torch.long)
        self.position_ids = torch.zeros(B, L, dtype=torch.long)
        self.block_position_ids = torch.zeros(B, L, dtype=torch.long)
        self.segment_ids = torch.zeros(B, L, dtype=torch.long)
        self.prefix_mask = torch.zeros(B, L, dtype=torch.long)
        for row, (q, ctx) in enumerate(zip(queries, contexts)):
            n_a, off = len(q.part_a), L - len(ctx)
            pos, block = self.part_b(row, 0, 1)
            self.input_ids[row, off:] = torch.tensor(ctx)
            self.position_ids[row, off:] = torch.tensor(list(range(n_a)) + pos)
            self.block_position_ids[row, off + n_a:] = torch.tensor(block)
            self.segment_ids[row, off:] = 1
            self.prefix_mask[row, off:off + n_a] = 1
        for name in ("input_ids", "position_ids", "block_position_ids", "segment_ids", "prefix_mask"):
            setattr(self, name, getattr(self, name).to(device))

    def part_b(self, row: int, start: int, count: int) -> tuple[list[int], list[int]]:
        q = self.queries[row]
        return part_b_positions(q.mask_index, len(q.part_a), count, is_gmask=q.is_gmask, use_2d=self.use_2d, start=start)

    def step_inputs(self, step: int, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, 1) of the Part-B token number `step` (0 = [sop]) for each row."""
        rows = range(len(self.queries)) if rows is None else rows
        pos, block = zip(*(self.part_b(r, step, 1) for r in rows))
        device = self.input_ids.device
        return (torch.tensor([p[0] for p in pos], device=device)[:, None],
                torch.tensor([b[0] for b in block], device=device)[:, None])


def _stop_ids(special: SpecialTokens, config: GenerationConfig) -> list[int]:
    return sorted({special.eop, special.eos, *config.stop_token_ids})


@torch.no_grad()
def generate_spans(
    model: GLMModel,
    queries: list[SpanQuery],
    special: SpecialTokens,
    config: GenerationConfig,
    vocab_limit: int | None = None, utf8: Utf8Guard | None = None,
) -> list[list[int]]:
    """Generate one span per query (greedy or sampled, batched); returns tokens without the stop token."""
    if config.num_beams > 1:
        return [beam_search(model, q, special, config, vocab_limit, utf8) for q in queries]
    return generate_spans_with_stops(model, queries, special, config, vocab_limit, utf8)[0]


@torch.no_grad()
def generate_spans_with_stops(
    model: GLMModel,
    queries: list[SpanQuery],
    special: SpecialTokens,
    config: GenerationConfig,
    vocab_limit: int | None = None, utf8: Utf8Guard | None = None,
) -> tuple[list[list[int]], list[int | None]]:
    """`generate_spans` without beam search, also returning the stop token that ended each span
    (None for a span cut at max_new_tokens): what RL rollouts score as the last action."""
    if config.num_beams > 1:
        raise ValueError("generate_spans_with_stops does not do beam search")
    device = next(model.parameters()).device
    batch = PartBBatch(queries, special, model.config.uses_2d_positions, device)
    stop_ids = _stop_ids(special, config)
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    histories = [q.part_a + [special.sop] for q in queries]
    outputs: list[list[int]] = [[] for _ in queries]
    stops: list[int | None] = [None] * len(queries)
    done = [False] * len(queries)
    segment_ids, prefix_mask = batch.segment_ids, batch.prefix_mask
    out = model(batch.input_ids, batch.position_ids, batch.block_position_ids, segment_ids, prefix_mask, use_cache=True)
    for step in range(config.max_new_tokens):
        logits = process_logits(out.logits[:, -1].float(), histories, step, stop_ids, config, vocab_limit, utf8)
        next_tokens = sample_next(logits, config, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row], stops[row] = True, token
            else:
                outputs[row].append(token)
                histories[row].append(token)
        if all(done) or step == config.max_new_tokens - 1:
            break
        pos, block = batch.step_inputs(step + 1)
        ones = torch.ones(len(queries), 1, dtype=segment_ids.dtype, device=device)
        segment_ids = torch.cat((segment_ids, ones), dim=1)
        prefix_mask = torch.cat((prefix_mask, torch.zeros_like(ones)), dim=1)
        out = model(next_tokens[:, None], pos, block, segment_ids, prefix_mask,
                    past_key_values=out.past_key_values, use_cache=True)
    return outputs, stops


def _length_penalty(length: int, lp: float) -> float:
    return ((5.0 + length) / 6.0) ** lp


def beam_search(
    model: GLMModel, query: SpanQuery, special: SpecialTokens, config: GenerationConfig,
    vocab_limit: int | None = None, utf8: Utf8Guard | None = None,
) -> list[int]:
    """Beam search for one span (see `beam_search_steps`); returns the best hypothesis's tokens."""
    steps = beam_search_steps(model, query, special, config, vocab_limit, utf8)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@torch.no_grad()  # applies to every resumption of the generator
def beam_search_steps(
    model: GLMModel, query: SpanQuery, special: SpecialTokens, config: GenerationConfig,
    vocab_limit: int | None = None, utf8: Utf8Guard | None = None,
):
    """Beam search for one span, beams as the batch dimension of one KV cache; a generator that
    yields after each forward step (so a server can interleave it with other work) and returns
    the best hypothesis's tokens.

    Scores are cumulative log-probs; a finished hypothesis (ended by a stop token, counted in
    its length) scores log-prob / ((5 + len) / 6) ** lp. Search stops when no live beam, at
    the current length, beats the worst of `num_beams` finished hypotheses.
    """
    device = model_device(model)
    k = config.num_beams
    batch = PartBBatch([query], special, model.config.uses_2d_positions, device)
    stop_ids = _stop_ids(special, config)
    out = model(batch.input_ids, batch.position_ids, batch.block_position_ids, batch.segment_ids,
                batch.prefix_mask, use_cache=True)
    cache: KVCache = out.past_key_values
    segment_ids, prefix_mask = batch.segment_ids, batch.prefix_mask
    context = query.part_a + [special.sop]
    beams: list[tuple[float, list[int]]] = [(0.0, [])]  # (cum log-prob, tokens)
    finished: list[tuple[float, list[int]]] = []  # (penalised score, tokens)
    logits = out.logits[:, -1].float()
    for step in range(config.max_new_tokens):
        logits = process_logits(logits, [context + b[1] for b in beams], step, stop_ids, config, vocab_limit, utf8)
        logprobs = torch.log_softmax(logits, dim=-1) + torch.tensor([b[0] for b in beams], device=device)[:, None]
        top = torch.topk(logprobs.view(-1), min(2 * k, logprobs.numel()))
        vocab = logprobs.shape[-1]
        next_beams, parents = [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            parent, token = divmod(flat, vocab)
            if score == torch.finfo(torch.float32).min:
                continue
            tokens = beams[parent][1]
            if token in stop_ids:
                finished.append((score / _length_penalty(len(tokens) + 1, config.length_penalty), tokens))
            else:
                next_beams.append((score, tokens + [token]))
                parents.append(parent)
            if len(next_beams) == k:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if not next_beams:
            break
        best_live = max(s for s, _ in next_beams) / _length_penalty(step + 1, config.length_penalty)
        if len(finished) == k and best_live <= finished[-1][0]:
            break
        if step == config.max_new_tokens - 1:
            finished += [(s / _length_penalty(len(t), config.length_penalty), t) for s, t in next_beams]
            break
        beams = next_beams
        index = torch.tensor(parents, device=device)
        cache = select_cache(cache, index)
        n = len(beams)
        pos, block = batch.step_inputs(step + 1, [0] * n)
        segment_ids = torch.cat((segment_ids[:1].expand(n, -1), torch.ones(n, 1, dtype=torch.long, device=device)), 1)
        prefix_mask = torch.cat((prefix_mask[:1].expand(n, -1), torch.zeros(n, 1, dtype=torch.long, device=device)), 1)
        tokens = torch.tensor([b[1][-1] for b in beams], device=device)[:, None]
        yield
        out = model(tokens, pos, block, segment_ids, prefix_mask, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    if not finished:
        return []
    return max(finished, key=lambda f: f[0])[1]


# --- text-level API ----------------------------------------------------------------------


@dataclass
class FillResult:
    text: str
    """The input text with every mask replaced by its generated span."""
    token_ids: list[int]
    """The same, as token ids."""
    spans: list[list[int]] = field(default_factory=list)
    """Generated token ids of each mask, left to right."""


def mask_positions(ids: list[int], special: SpecialTokens) -> list[int]:
    """Positions of the mask tokens in `ids` (the blanks to fill, left to right)."""
    masks = set(special.mask_ids)
    return [j for j, t in enumerate(ids) if t in masks]


def splice_span(ids: list[int], positions: list[int], span: list[int]) -> tuple[list[int], list[int]]:
    """Replace the mask at positions[0] by `span`; the other positions shift with it. A mask
    token the model generates inside a span is text of that span, never a new blank to fill
    (otherwise a span that generates a mask would be filled again, forever under greedy)."""
    j = positions[0]
    return ids[:j] + span + ids[j + 1:], [p + len(span) - 1 for p in positions[1:]]


def fill_blanks(
    model: GLMModel, tokenizer: GLMTokenizer, texts: list[str], config: GenerationConfig
) -> list[FillResult]:
    """GLM blank filling (GLM_SPEC.md section 5) for a batch of texts.

    A text without [MASK] / [sMASK] / [gMASK] gets [gMASK] appended (mask strings in the text are
    the blank-filling syntax: `GLMTokenizer.encode_with_masks`). Masks are filled one at a
    time, left to right, each exactly once: Part A = the current text, then [sop] + generation until [eop]; the
    span is spliced in place of the mask before the next one is filled.
    """
    special = tokenizer.special
    states, todo = [], []  # todo[i]: positions of text i's masks still to fill (only the text's own)
    for text in texts:
        ids, masks = tokenizer.encode_with_masks(text)
        if not masks:
            ids.append(special.gmask)
        states.append(FillResult(text="", token_ids=ids))
        todo.append(mask_positions(ids, special))
    while any(todo):
        pending = [(i, todo[i][0]) for i in range(len(states)) if todo[i]]
        queries = [SpanQuery(states[i].token_ids, j, states[i].token_ids[j] == special.gmask) for i, j in pending]
        spans = generate_spans(model, queries, special, config, vocab_limit=len(tokenizer),
                               utf8=Utf8Guard.of(tokenizer))
        for (i, j), span in zip(pending, spans):
            s = states[i]
            s.token_ids, todo[i] = splice_span(s.token_ids, todo[i], span)
            s.spans.append(span)
    for s in states:
        s.text = tokenizer.decode(s.token_ids)
    return states


def chat(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    query: str,
    history: list[tuple[str, str]] | None = None,
    config: GenerationConfig | None = None,
    chat_format: ChatFormat | None = None,
) -> tuple[str, list[tuple[str, str]]]:
    """One chat turn: returns (response, history with this turn appended).

    The prompt is `chat_format`'s (`glm.chat_format`; default ChatGLM-6B's, the format a
    checkpoint without a recorded one was trained in); the format's other role tokens stop the reply.

    The prompt is followed by [gMASK] [sop]; only that final mask is generated, so mask
    strings a user types stay plain text in Part A. A prompt too long for the context window
    is cut from the left (oldest rounds first). Without a config: ChatGLM's sampling defaults
    (`chat_generation_config`).
    """
    config = config or chat_generation_config(256)
    special = tokenizer.special
    fmt = chat_format or get_chat_format("chatglm_6b", tokenizer)
    messages = [Message(role, text) for q, r in history or [] for role, text in (("user", q), ("assistant", r))]
    ids = fmt.prompt(messages + [Message("user", query)])
    if fmt.stop_ids():
        config = dataclasses.replace(config, stop_token_ids=[*config.stop_token_ids, *fmt.stop_ids()])
    room = model.config.max_seq_len - config.max_new_tokens - 2
    if room <= 0:
        raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room in max_seq_len {model.config.max_seq_len}")
    ids = ids[-room:] + [special.gmask]
    [span] = generate_spans(model, [SpanQuery(ids, len(ids) - 1, True)], special, config, vocab_limit=len(tokenizer),
                             utf8=Utf8Guard.of(tokenizer))
    response = fmt.parse_reply(tokenizer.decode(span)).content.strip()
    return response, list(history or []) + [(query, response)]

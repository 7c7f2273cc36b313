"""Structured output: `response_format` enforced by grammar-constrained decoding (llguidance).

A JSON schema (or "any JSON object" for `json_object`) is compiled by llguidance into a
grammar over bytes; each constrained row of the decode loop holds its own `GrammarMatcher`,
which at every step computes the bitmask of the tokens that keep the text a prefix of a
valid document, and consumes the token that was picked. Rows without a grammar (no
response format, no forced tool call) have no matcher and pay nothing.

The tokenizer adapter (`vocabulary`) gives llguidance the bytes each GLMTokenizer token adds
to decoded text: byte-fallback pieces `<0xXX>` their byte, SentencePiece's U+2581 a space,
ChatGLM's whitespace pieces their whitespace; control tokens, `<unk>`, GLM's mask and span
tokens (and any user-defined piece that encoding its text does not produce) are special:
a grammar allows them only where it names them (the tool-call grammar's separator), except
the end tokens generation stops at ([eop] and </s>), allowed once the document is complete.

Whitespace is not left to the model (`JSON_OPTIONS`): documents are written the way Python's
`json.dumps` writes them, `", "` between items and `": "` after keys and no other whitespace
outside strings, so a model cannot run away in whitespace (a tiny random model, given the
choice, spends most of its tokens on tabs and spaces). It may still write a long string or
number until `max_tokens`, in which case the answer ends with finish_reason "length" and is
incomplete JSON.

Tool calls (`tool_choice` required or a named function) are constrained the same way by one
grammar per request (`tool_calls_lark`): the reply is a call header (`name\\n`, one of the
allowed functions) followed by arguments valid under that function's `parameters` schema
(embedded JSON schemas, llguidance's `%json`), then either the end or, when parallel calls are
allowed, the separator token and another call.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from glm.tokenizer import GLMTokenizer

LLGUIDANCE = "llguidance==1.9.1"
"""The package (and the version tested) that compiles schemas to token masks."""
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance JSON compile options, applied over any `x-guidance` options of the schema: no
free whitespace, json.dumps's separators."""
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of `{"type": "json_object"}`."""
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
"""The arguments of a function defined without `parameters` (OpenAI: an empty parameter list)."""
ALLOWED_FLOOR = -1e30
"""A token the grammar allows is never excluded outright: a ban (`no_repeat_ngram_size`) only
lowers it to this, so it is chosen only when every allowed token is banned (the grammar wins);
it stays finite after dividing by any accepted temperature."""

_BITS = torch.tensor([1 << b for b in range(31)] + [-(1 << 31)], dtype=torch.int32)
"""Bit b of an int32 word of llguidance's bitmask (token 32 x word + b)."""


def llguidance():
    """The llguidance module, or a clear error naming what to install."""
    try:
        import llguidance as llg
    except ImportError:
        raise RuntimeError(f"structured output (response_format) needs the llguidance package on the server: "
                           f"pip install {LLGUIDANCE}") from None
    return llg


def vocabulary(tokenizer: GLMTokenizer) -> tuple[list[bytes], list[int]]:
    """(bytes of each token id, the special token ids). A special token's entry is 0xFF and its
    piece (llguidance's convention: such a token never matches text)."""
    from sentencepiece import sentencepiece_model_pb2

    sp = tokenizer.sp
    pieces = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.to_bytes()).pieces
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    glm_special = {tokenizer.special.mask, tokenizer.special.smask, tokenizer.special.gmask,
                   tokenizer.special.sop, tokenizer.special.eop, tokenizer.special.pad, tokenizer.special.eos}
    tokens, special = [], []
    for i in range(len(tokenizer)):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            tokens.append(bytes([int(piece[1:-1], 16)]))  # "<0xE4>"
            continue
        if "\u2581" in piece:  # SentencePiece's space (decode may drop it at the start of a text)
            text = piece.replace("\u2581", " ")
        else:
            text = tokenizer.decode([i])  # ChatGLM's whitespace pieces ("<n>" -> "\n") as decoded
        is_special = (i in glm_special or sp.is_control(i) or sp.is_unknown(i)
                      or (pieces[i].type == user_defined and i not in tokenizer.encode(text)))
        if is_special:
            special.append(i)
            tokens.append(b"\xff" + piece.encode("utf-8"))
        else:
            tokens.append(text.encode("utf-8"))
    return tokens, special


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, special ids, end token, tokenize."""

    def __init__(self, tokenizer: GLMTokenizer, end_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens, self.special_token_ids = vocabulary(tokenizer)
        self.eos_token_id, self.bos_token_id = end_ids[0], None

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # the wrapper then passes text as str
            raise TypeError("GLMTokenizer encodes text (str), not bytes")
        return self.tokenizer.encode(text)


class Grammars:
    """Compiles response formats for one tokenizer and makes a matcher per constrained row.

    `end_ids` are the tokens that end a generation (`[eop]`, `</s>`: what glm.generation stops
    at); the grammar allows them once the document is complete."""

    def __init__(self, tokenizer: GLMTokenizer):
        llg = llguidance()
        self.end_ids = sorted({tokenizer.special.eop, tokenizer.special.eos})
        self.vocab_size = len(tokenizer)
        self.lltokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer, self.end_ids)),
                                           eos_token=self.end_ids)

    def compile(self, schema: dict[str, Any]) -> str:
        """The grammar of JSON documents valid under `schema`; ValueError naming what is wrong
        when llguidance cannot compile it."""
        llg = llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"not a JSON schema: {e}") from None
        return self._validated(grammar, "the schema cannot be compiled")

    def compile_tool_calls(self, calls: dict[str, dict[str, Any] | None], separator: str | None) -> str:
        """The grammar of a reply made of tool calls (`tool_calls_lark`); ValueError naming the
        function whose parameters schema llguidance cannot compile."""
        try:
            grammar = llguidance().LLMatcher.grammar_from_lark(tool_calls_lark(calls, separator))
            return self._validated(grammar, "the tool-call grammar cannot be compiled")
        except ValueError as e:
            for header, schema in calls.items():  # which function's schema it is
                try:
                    self.compile(NO_PARAMETERS if schema is None else schema)
                except ValueError as bad:
                    raise ValueError(f"function {header.strip()!r}: its parameters schema cannot be used: "
                                     f"{bad}") from None
            raise ValueError(f"the tool-call grammar cannot be compiled: {e}") from None

    def _validated(self, grammar: str, otherwise: str) -> str:
        is_error, messages = llguidance().LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            message = " ".join(line.strip() for line in (messages[0] if messages else "").splitlines())
            raise ValueError(message[:500] or otherwise)
        return grammar

    def matcher(self, grammar: str) -> "GrammarMatcher":
        return GrammarMatcher(self, grammar)


def tool_calls_lark(calls: dict[str, dict[str, Any] | None], separator: str | None) -> str:
    """llguidance's Lark grammar of a reply that is one or more tool calls.

    `calls`: each allowed call's header text (the chat format's metadata line, `name\\n`) ->
    the function's parameters JSON schema (None: no parameters, `NO_PARAMETERS`). A call is a
    header then its arguments, one JSON document valid under that schema, written as `compile`
    writes documents (`JSON_OPTIONS` over the schema's own `x-guidance`). `separator`: the
    special token (by name, e.g. `<|assistant|>`) between calls, so after each call the reply
    may end or go on with another; None: exactly one call, after which only the end may follow."""
    if not calls:
        raise ValueError("no tool call to constrain to")
    rules = []
    for i, (header, schema) in enumerate(calls.items()):
        schema = dict(NO_PARAMETERS if schema is None else schema)
        own = schema.get("x-guidance")
        schema["x-guidance"] = {**(own if isinstance(own, dict) else {}), **JSON_OPTIONS}
        rules.append(f"arguments_{i}: %json {json.dumps(schema)}")
    call = " | ".join(f"{json.dumps(header)} arguments_{i}" for i, header in enumerate(calls))
    start = f"start: call ({separator} call)*" if separator else "start: call"
    return "\n".join([start, f"call: {call}", *rules]) + "\n"


class GrammarMatcher:
    """One row's grammar state: masks its logits, consumes its tokens (engine thread)."""

    def __init__(self, grammars: Grammars, grammar: str):
        llg = llguidance()
        self.matcher = llg.LLMatcher(grammars.lltokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.vocab_size = grammars.vocab_size
        self._bitmask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that may come next."""
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        return ((self._bitmask[:, None] & _BITS) != 0).view(-1)[:self.vocab_size]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Exclude the tokens the grammar does not allow from (1, V) logits, in place (padding
        beyond the tokenizer's vocabulary too); allowed tokens that a ban set to the most
        negative float are raised to ALLOWED_FLOOR."""
        allowed = self.allowed().to(logits.device, non_blocking=True)
        V = self.vocab_size
        logits[0, :V] = torch.where(allowed, logits[0, :V].clamp_min(ALLOWED_FLOOR), float("-inf"))
        logits[0, V:] = float("-inf")
        return logits

    def consume(self, token: int) -> None:
        """Advance past the picked token (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar matcher refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The document is complete and nothing may follow it but an end token."""
        return self.matcher.is_stopped()

"""Instruction and dialogue rows -> ChatGLM-formatted samples of the sample schema.

A conversation is a list of (user, assistant) rounds. Each trained assistant turn becomes
one sample: the ChatGLM multi-round prompt of the earlier rounds and the query
(`glm.generation.build_chat_prompt`, the same text `glm.generation.chat` builds at inference)
is the bidirectional prefix, then [gMASK] [sop] + response, with targets response + [eop].
Prompts too long for the row are cut from the left; the response is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glm.generation import build_chat_prompt
from glm.schema import Sample, layout_prompted, pack_samples
from glm.tokenizer import GLMTokenizer

USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "bot", "model")


class BadRow(ValueError):
    """A row that fits no supported shape; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Conversation:
    rounds: list[tuple[str, str]] = field(default_factory=list)
    """(user, assistant) pairs in order."""
    system: str = ""
    """A system message, prepended to the first query (ChatGLM has no system role)."""


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{what} is {type(value).__name__}, not a string")
    return value


def _from_alpaca(row: dict) -> Conversation:
    instruction = _text(row.get("instruction"), "instruction")
    extra = _text(row.get("input") or "", "input")
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise BadRow("bad_history", "history is not a list of [query, response] pairs")
    rounds = [(_text(q, "history query"), _text(r, "history response")) for q, r in history]
    return Conversation(rounds + [(query, _text(row.get("output"), "output"))])


def _from_turns(turns: Any, role_key: str, text_key: str) -> Conversation:
    if not isinstance(turns, list) or not turns:
        raise BadRow("empty_conversation", "no turns")
    conv, pending = Conversation(), None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"turn {i} is {type(turn).__name__}, not an object")
        role = str(turn.get(role_key, "")).lower()
        text = _text(turn.get(text_key), f"turn {i} {text_key}")
        if role == "system" and i == 0:
            conv.system = text
        elif role in USER_ROLES and pending is None:
            pending = text
        elif role in ASSISTANT_ROLES and pending is not None:
            conv.rounds.append((pending, text))
            pending = None
        else:
            raise BadRow("bad_turn_order", f"turn {i} has role {role!r} where a "
                                           f"{'user' if pending is None else 'assistant'} turn was expected")
    if not conv.rounds:
        raise BadRow("no_assistant_turn", "no assistant reply")
    return conv


def parse_row(row: Any, fmt: str = "auto") -> Conversation:
    """One JSON row -> Conversation, or BadRow naming why it does not fit."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"row is {type(row).__name__}")
    if fmt == "auto":
        fmt = ("messages" if "messages" in row else "conversations" if "conversations" in row
               else "alpaca" if "instruction" in row else "")
        if not fmt:
            raise BadRow("unknown_shape", f"no instruction, conversations or messages field (keys: {sorted(row)[:8]})")
    if fmt == "alpaca":
        conv = _from_alpaca(row)
    elif fmt == "conversations":
        conv = _from_turns(row.get("conversations"), "from", "value")
    else:
        conv = _from_turns(row.get("messages"), "role", "content")
    if conv.system and conv.rounds:
        q, r = conv.rounds[0]
        conv.rounds[0] = (f"{conv.system}\n{q}", r)
    for q, r in conv.rounds:
        if not q.strip():
            raise BadRow("empty_query", "a user turn is empty")
        if not r.strip():
            raise BadRow("empty_response", "an assistant turn is empty")
    return conv


def conversation_samples(conv: Conversation, tokenizer: GLMTokenizer, seq_len: int, *, use_2d: bool,
                         last_turn_only: bool = False) -> list[Sample]:
    """The training samples of one conversation (one per trained assistant turn).

    Raises BadRow("response_too_long") when a response alone does not fit in seq_len.
    """
    special = tokenizer.special
    turns = range(len(conv.rounds) - 1, len(conv.rounds)) if last_turn_only else range(len(conv.rounds))
    samples = []
    for i in turns:
        query, response = conv.rounds[i]
        prompt = tokenizer.encode(build_chat_prompt(query, conv.rounds[:i]))
        answer = tokenizer.encode(response.strip())
        if len(answer) + 3 > seq_len:  # at least one prompt token, [gMASK], [sop]
            raise BadRow("response_too_long", f"response of {len(answer)} tokens does not fit in seq_len {seq_len}")
        samples.append(layout_prompted(prompt, answer, special, use_2d=use_2d, mask_token=special.gmask,
                                       max_len=seq_len))
    return samples


def pack_rows(samples: list[Sample], seq_len: int, pad_id: int, pack: bool = True) -> list[dict[str, list[int]]]:
    """Rows of the schema: samples in order, several per row (segments) when `pack`."""
    rows, current, used = [], [], 0
    for s in samples:
        if current and (not pack or used + len(s) > seq_len):
            rows.append(pack_samples(current, seq_len, pad_id))
            current, used = [], 0
        current.append(s)
        used += len(s)
    if current:
        rows.append(pack_samples(current, seq_len, pad_id))
    return rows

"""Instruction and dialogue rows -> chat-formatted samples of the sample schema.

A conversation is a list of messages (system, user, assistant with optional tool calls, tool
results) and the tools offered. Each trained assistant message becomes one sample: the chat
format's prompt of the messages before it (`glm.chat_format`, the same tokens the serve
endpoint and `glm.generation.chat` build at inference) is the bidirectional prefix, then
[gMASK] [sop] + the reply, with targets reply + [eop]. So only assistant turns, tool calls
included, are ever targets; system, user and tool messages are context. Prompts too long for
the row are cut from the left; the reply is never cut.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from glm.chat_format import ChatFormat, ChatFormatError, Message, chat_format, from_openai
from glm.schema import Sample, layout_prompted, pack_samples
from glm.tokenizer import GLMTokenizer

USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "bot", "model")
TOOL_ROLES = ("tool", "observation", "function")


class BadRow(ValueError):
    """A row that fits no supported shape; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    """Function definitions offered to the model (OpenAI's `function` objects)."""

    @classmethod
    def of_rounds(cls, rounds: list[tuple[str, str]], system: str = "") -> "Conversation":
        """A plain conversation of (user, assistant) rounds."""
        messages = [Message("system", system)] if system else []
        return cls(messages + [Message(role, text) for q, r in rounds for role, text in (("user", q), ("assistant", r))])

    @property
    def rounds(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs of a plain conversation, a system message opening the first
        query (as the ChatGLM-6B format renders it)."""
        system = "\n".join(m.content for m in self.messages if m.role == "system")
        turns = [m.content for m in self.messages if m.role in ("user", "assistant")]
        if system and turns:
            turns[0] = f"{system}\n{turns[0]}"
        return list(zip(turns[0::2], turns[1::2]))


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
    return Conversation.of_rounds(rounds + [(query, _text(row.get("output"), "output"))])


def _from_turns(turns: Any, role_key: str, text_key: str) -> list[dict]:
    """ShareGPT / OpenAI turns -> OpenAI-shaped messages (role names normalised)."""
    if not isinstance(turns, list) or not turns:
        raise BadRow("empty_conversation", "no turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"turn {i} is {type(turn).__name__}, not an object")
        role = str(turn.get(role_key, "")).lower()
        role = ("user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES
                else "tool" if role in TOOL_ROLES else role)
        text = turn.get(text_key)
        if not (role == "assistant" and turn.get("tool_calls") and text is None):
            _text(text, f"turn {i} {text_key}")
        out.append({**turn, "role": role, "content": text})
    return out


def _check_order(messages: list[Message]) -> None:
    """System first; then user, assistant (calls answered by tool messages), user, ..."""
    previous = None
    for i, m in enumerate(messages):
        allowed = {None: ("system", "user"), "system": ("user",), "user": ("assistant",),
                   "assistant": ("user", "tool") if messages[i - 1].tool_calls else ("user",),
                   "tool": ("tool", "assistant")}[previous]
        if m.role not in allowed:
            raise BadRow("bad_turn_order", f"turn {i} has role {m.role!r} where {' or '.join(allowed)} was expected")
        previous = m.role


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
    else:
        turns = _from_turns(row.get("conversations"), "from", "value") if fmt == "conversations" else \
            _from_turns(row.get("messages"), "role", "content")
        try:
            conv = Conversation(from_openai(turns))
        except ChatFormatError as e:
            raise BadRow("bad_message", str(e)) from None
        tools = row.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRow("bad_tools", "tools is not a list of objects")
        conv.tools = [t.get("function", t) if t.get("type") == "function" else t for t in tools]
    _check_order(conv.messages)
    if not any(m.role == "assistant" for m in conv.messages):
        raise BadRow("no_assistant_turn", "no assistant reply")
    for m in conv.messages:
        if m.role == "user" and not m.content.strip():
            raise BadRow("empty_query", "a user turn is empty")
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            raise BadRow("empty_response", "an assistant turn is empty")
    return conv


_SENTENCE_END = re.compile(r"[。！？!?…](?:[”’」』\)）\"'])*|\.(?=\s|$)(?:[\"')\]])*|\n")
"""Where a reply may be cut: after a sentence's end mark (and its closing quotes) or a line break."""


def cut_reply(text: str, max_tokens: int, tokenizer: GLMTokenizer) -> str | None:
    """The reply cut after its last sentence end within max_tokens tokens (whole when it fits);
    None when no sentence ends within the limit."""
    if len(tokenizer.encode(text)) <= max_tokens:
        return text
    best = None
    for m in _SENTENCE_END.finditer(text):
        head = text[:m.end()].rstrip()
        if len(tokenizer.encode(head)) > max_tokens:
            break
        best = head
    return best if best and best.strip() else None


def shorten_replies(conv: Conversation, max_tokens: int, tokenizer: GLMTokenizer) -> Conversation:
    """Every assistant text reply cut at a sentence end to at most max_tokens tokens (replies with
    tool calls kept whole); BadRow("reply_too_long") when one has no sentence end within it."""
    messages = []
    for i, m in enumerate(conv.messages):
        if m.role == "assistant" and not m.tool_calls:
            text = cut_reply(m.content, max_tokens, tokenizer)
            if text is None:
                raise BadRow("reply_too_long", f"assistant turn {i}: no sentence ends within {max_tokens} tokens")
            m = dataclasses.replace(m, content=text)
        messages.append(m)
    return dataclasses.replace(conv, messages=messages)


def conversation_samples(conv: Conversation, tokenizer: GLMTokenizer, seq_len: int, *, use_2d: bool,
                         last_turn_only: bool = False, fmt: ChatFormat | None = None) -> list[Sample]:
    """The training samples of one conversation (one per trained assistant message) in the chat
    format `fmt` (default ChatGLM-6B's).

    Raises BadRow("response_too_long") when a reply alone does not fit in seq_len, and
    BadRow("unsupported_by_format") when the format cannot carry the conversation (tools in
    the ChatGLM-6B format).
    """
    fmt = fmt or chat_format("chatglm_6b", tokenizer)
    try:
        turns = fmt.turns(conv.messages, conv.tools)
    except ChatFormatError as e:
        raise BadRow("unsupported_by_format", str(e)) from None
    samples = []
    for prompt, answer in turns[-1:] if last_turn_only else turns:
        if len(answer) + 3 > seq_len:  # at least one prompt token, [gMASK], [sop]
            raise BadRow("response_too_long", f"response of {len(answer)} tokens does not fit in seq_len {seq_len}")
        samples.append(layout_prompted(prompt, answer, tokenizer.special, use_2d=use_2d,
                                       mask_token=tokenizer.special.gmask, max_len=seq_len))
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

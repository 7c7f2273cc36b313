"""Synthetic preference pairs from SFT chats, in families whose signal a small reward model can
learn. The chosen side is a chat's last reply (its earlier turns the prompt); the rejected side
is that reply spoiled in the family's way:

- `language`: the last reply of another chat, in the other language (zh <-> en; the language
  of a text is the project's rule, `stages.effects.language`);
- `repetition`: the reply's start up to a phrase of it, then that phrase looped (at least
  `min_repeats` times, until the text is as long as the reply);
- `truncated`: the reply's first 2 to `truncated_chars` characters.

Everything is drawn from RNGs seeded by (config seed, the chat's JSONL line, the pair's draw)
(the `language` family from the sorted replies of its split), so the pairs depend on content
and config only, never on paths, file order or the process.
The chats are read with the SFT stage's row parsing (`stages.sft.formatting.parse_row`).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from stages.effects import language as text_language
from stages.rlhf.config import SyntheticPairsConfig
from stages.sft.formatting import BadRow, parse_row

WORD_UNITS = re.compile(r"\s*\S+")
PREFIX_CHARS = 12
"""`repetition`: the unspoiled start before the loop is at most this many characters (and half
the reply), so the loop fills the reply however short the row cuts it."""


@dataclass
class Chat:
    """A chat's context and last reply (`PreferencePair` fields without the rejected side)."""

    query: str
    reply: str
    history: list[tuple[str, str]]
    system: str = ""


def parse_chat(row, fmt: str = "auto") -> Chat:
    """One SFT row (`stages.sft.formatting.parse_row`'s shapes) -> its context and last reply;
    BadRow for chats with tools or tool calls."""
    conv = parse_row(row, fmt)
    messages = conv.messages
    if conv.tools or any(m.tool_calls or m.role == "tool" for m in messages):
        raise BadRow("tool_calls", "a chat with tools (synthetic pairs take plain chats)")
    while messages[-1].role != "assistant":
        messages = messages[:-1]
    system = messages[0].content if messages[0].role == "system" else ""
    turns = [m.content for m in messages if m.role in ("user", "assistant")]
    rounds = list(zip(turns[0::2], turns[1::2]))
    (query, reply), history = rounds[-1], rounds[:-1]
    if not reply.strip():
        raise BadRow("empty_response", "the last reply is empty")
    return Chat(query.strip(), reply.strip(), history, system)


def language(text: str) -> str:
    """The project's language rule (`stages.effects.language`); text without letters counts as "en"."""
    return text_language(text) or "en"


def rng_of(seed: int, *keys) -> random.Random:
    blob = "\x1f".join(map(str, (seed, *keys))).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


def looped(reply: str, rng: random.Random, min_repeats: int) -> str:
    """`repetition`: the reply's start, then one of its phrases (2-6 CJK characters or 1-3
    words) repeated until the text is as long as the reply (at least min_repeats times)."""
    chinese = language(reply) == "zh"
    units = list(reply) if chinese else WORD_UNITS.findall(reply)
    size = rng.randint(2, 6) if chinese else rng.randint(1, 3)
    starts = [i for i in range(len(units) - size + 1)
              if len("".join(units[:i])) <= min(PREFIX_CHARS, len(reply) // 2)]
    starts = [i for i in starts if "".join(units[i:i + size]).strip()]
    if not starts:
        return ""
    at = rng.choice(starts)
    phrase = "".join(units[at:at + size])
    if not chinese and not phrase[0].isspace():
        phrase = " " + phrase
    prefix = "".join(units[:at])
    repeats = max(min_repeats, -(-(len(reply) - len(prefix)) // len(phrase)))
    return (prefix + phrase * repeats).strip()


def cut_short(reply: str, rng: random.Random, max_chars: int) -> str:
    """`truncated`: the first 2..max_chars characters; "" for a reply under 4 x max_chars."""
    if len(reply) < 4 * max_chars:
        return ""
    return reply[:rng.randint(2, max_chars)].rstrip()


def draw_family(weights: dict[str, float], rng: random.Random) -> str:
    names = sorted(f for f, w in weights.items() if w > 0)
    return rng.choices(names, weights=[weights[f] for f in names])[0]


def synthetic_pairs(chats: list[tuple[str, str, Chat]], cfg: SyntheticPairsConfig, seed: int):
    """(split, line, chat) of every chat -> (split, family, chat, rejected reply): pairs_per_chat
    draws per chat; the rejected reply is "" where the family cannot spoil that chat. The
    `language` family's rejected reply comes from a chat of the same split (no held-out reply
    is trained on)."""
    others: dict[tuple[str, str], list[str]] = {}
    for split, _, chat in chats:
        others.setdefault((split, language(chat.reply)), []).append(chat.reply)
    others = {k: sorted(v) for k, v in others.items()}  # independent of the order of the files
    for split, line, chat in chats:
        for draw in range(cfg.pairs_per_chat):
            rng = rng_of(seed, line, draw)
            family = draw_family(cfg.families, rng)
            if family == "language":
                pool = [r for r in others.get((split, "en" if language(chat.reply) == "zh" else "zh"), [])
                        if r != chat.reply]
                rejected = rng.choice(pool) if pool else ""
            elif family == "repetition":
                rejected = looped(chat.reply, rng, cfg.min_repeats)
            else:
                rejected = cut_short(chat.reply, rng, cfg.truncated_chars)
            yield split, family, chat, rejected if rejected != chat.reply else ""

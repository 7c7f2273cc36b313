"""Preference pairs -> rows of the sample schema, written like the SFT stage's prepared data
(manifest.json, train/ and validation/ Parquet shards, tokenizer.model) so the engine's
ShardSource reads them unchanged.

- Pair rows (reward, dpo): segment 1 is prompt + [gMASK] [sop] chosen, segment 2 the same
  prompt with the rejected reply; both in the model's chat format (`glm.chat_format`, the
  prompt a bidirectional prefix, targets the reply + [eop]). One row = one pair, so the
  engine's per-row data position never separates the two sides.
- Prompt rows (ppo): Part A only (prompt + [gMASK]), one per distinct prompt.

Besides the sources' pairs, synthetic pairs made from SFT chats (`stages/rlhf/families.py`).
Every pair carries a family tag (a real pair: its source's name); the manifest lists the tag
of every held-out row (`validation_families`) for the per-family accuracy at export.

Malformed pairs (missing side, empty chosen, not text, ...) are counted per reason and skipped.
"""

from __future__ import annotations

import functools
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from glm.chat_format import CHATGLM_6B, ChatFormat, Message, chat_format
from glm.schema import COLUMNS, Sample, layout_prompted, pack_samples
from glm.tokenizer import GLMTokenizer
from stages import storage
from stages.rlhf import families
from stages.rlhf.config import PreferenceDataConfig
from stages.sft.data import completed, read_jsonl_rows, split_of, write_prepared
from stages.sft.formatting import ASSISTANT_ROLES, USER_ROLES, BadRow


@dataclass
class PreferencePair:
    query: str
    chosen: str
    rejected: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str = ""

    def messages(self) -> list[Message]:
        """The conversation the replies answer."""
        messages = [Message("system", self.system)] if self.system else []
        for q, r in self.history:
            messages += [Message("user", q), Message("assistant", r)]
        return messages + [Message("user", self.query)]


def _reply(value, side: str) -> str:
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if value is None:
        raise BadRow("missing_side", f"no {side} reply")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{side} is {type(value).__name__}, not a string")
    return value.strip()


def _transcript_rounds(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """An hh-rlhf style "Human: ... Assistant: ..." transcript -> (last query, earlier rounds);
    a prompt without those markers is the query itself."""
    text = prompt.strip()
    if not text.startswith("Human:"):
        return text, []
    turns, role, buf = [], None, []
    for line in text.split("\n"):
        for marker, who in (("Human:", "user"), ("Assistant:", "assistant")):
            if line.startswith(marker):
                if role is not None:
                    turns.append((role, "\n".join(buf).strip()))
                role, buf = who, [line[len(marker):]]
                break
        else:
            buf.append(line)
    turns.append((role, "\n".join(buf).strip()))
    if turns[-1] == ("assistant", ""):  # the transcript ends with the reply to be written
        turns.pop()
    return _rounds_from_turns(turns)


def _rounds_from_turns(turns: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    if not turns or turns[-1][0] != "user":
        raise BadRow("no_final_query", "the conversation does not end with a user turn")
    history, pending = [], None
    for role, text in turns[:-1]:
        if role == "user" and pending is None:
            pending = text
        elif role == "assistant" and pending is not None:
            history.append((pending, text))
            pending = None
        else:
            raise BadRow("bad_turn_order", f"a {role} turn where the other role was expected")
    if pending is not None:
        raise BadRow("bad_turn_order", "two user turns in a row")
    return turns[-1][1], history


def _context(row, fmt: str) -> tuple[str, list[tuple[str, str]], str]:
    """(query, history, system) of a row whose shape is `fmt` ("auto": recognised)."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"row is {type(row).__name__}")
    if fmt == "auto":
        fmt = ("conversation" if "conversation" in row else "instruction" if "instruction" in row
               else "prompt" if "prompt" in row else "")
        if not fmt:
            raise BadRow("unknown_shape", f"no prompt, conversation or instruction field (keys: {sorted(row)[:8]})")
    system = ""
    if fmt == "prompt":
        if not isinstance(row.get("prompt"), str):
            raise BadRow("wrong_type", "prompt is not a string")
        query, history = _transcript_rounds(row["prompt"])
    elif fmt == "conversation":
        turns = row.get("conversation")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise BadRow("wrong_type", "conversation is not a list of turns")
        parsed = []
        for t in turns:
            role = str(t.get("role", t.get("from", ""))).lower()
            text = t.get("content", t.get("value"))
            if not isinstance(text, str):
                raise BadRow("wrong_type", "a turn's content is not a string")
            parsed.append(("user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role, text))
        if len(parsed) > 1 and parsed[0][0] == "system" and parsed[1][0] == "user":
            system = parsed.pop(0)[1]  # the chat format renders it (ChatGLM-6B's: opening the first query)
        query, history = _rounds_from_turns(parsed)
    else:
        instruction, extra = row.get("instruction"), row.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise BadRow("wrong_type", "instruction / input is not a string")
        query = f"{instruction}\n{extra}" if extra.strip() else instruction
        raw = row.get("history") or []
        if not isinstance(raw, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2
                                                and all(isinstance(x, str) for x in h) for h in raw):
            raise BadRow("bad_history", "history is not a list of [query, response] pairs")
        history = [(q, r) for q, r in raw]
    if not query.strip():
        raise BadRow("empty_query", "the prompt is empty")
    return query.strip(), history, system


def parse_pair(row, fmt: str = "auto") -> PreferencePair:
    """One JSON row -> PreferencePair, or BadRow naming why it does not fit."""
    query, history, system = _context(row, fmt)
    pair = PreferencePair(query, _reply(row.get("chosen"), "chosen"), _reply(row.get("rejected"), "rejected"),
                          history, system)
    if not pair.chosen:
        raise BadRow("empty_chosen", "the chosen reply is empty")
    if not pair.rejected:
        raise BadRow("empty_rejected", "the rejected reply is empty")
    if pair.chosen == pair.rejected:
        raise BadRow("identical_sides", "chosen and rejected are the same text")
    return pair


def parse_prompt(row) -> PreferencePair:
    """A row as a prompt to answer (a PreferencePair without replies): any shape `parse_pair`
    reads, a `query` (with an optional `history` [[q, a], ...]) or OpenAI `messages` (a final
    assistant turn, the reply of a chat, is dropped); replies in the row are ignored."""
    if isinstance(row, dict) and "query" in row and "instruction" not in row:
        row = {"instruction": row["query"], "history": row.get("history")}
    elif isinstance(row, dict) and "messages" in row:
        turns = row["messages"]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and \
                str(turns[-1].get("role", "")).lower() in ASSISTANT_ROLES:
            turns = turns[:-1]
        row = {"conversation": turns}
    query, history, system = _context(row, "auto")
    return PreferencePair(query, "", "", history, system)


def prompt_ids(pair: PreferencePair, fmt: ChatFormat) -> list[int]:
    return fmt.prompt(pair.messages())


def reply_room(prompt: list[int], max_len: int) -> int:
    """Tokens a reply may take beside this prompt (the prompt keeps at most a quarter)."""
    return max_len - 2 - min(len(prompt), max_len // 4)


def side_sample(prompt: list[int], response: list[int], tokenizer: GLMTokenizer, max_len: int,
                use_2d: bool) -> tuple[Sample, bool]:
    """prompt + [gMASK] [sop] response in max_len tokens; (sample, whether the response was cut)."""
    room = reply_room(prompt, max_len)
    cut = len(response) > room
    return layout_prompted(prompt, response[:room], tokenizer.special, use_2d=use_2d,
                           mask_token=tokenizer.special.gmask, max_len=max_len), cut


SENTENCE_END = re.compile(r"[。！？!?…；;]+|\.(?=\s)|\n")
CLAUSE_END = re.compile(r"[，,、：:）)]")


def fit_reply(text: str, fmt: ChatFormat, room: int, min_chars: int = 0) -> tuple[list[int], bool]:
    """The reply's tokens in the chat format and whether they were cut to fit `room` tokens: at
    the last sentence end (。！？!?…；; a period before a space, a line break) that fits and
    keeps at least `min_chars` characters, so a cut reply still ends like a finished one; else
    at the last clause end (，,、:) that does; else after `room` tokens."""
    def tokens(end: int) -> list[int]:
        return fmt.reply(Message("assistant", text[:end].rstrip()))

    ids = tokens(len(text))
    if len(ids) <= room:
        return ids, False
    for boundary in (SENTENCE_END, CLAUSE_END):
        ends = [m.end() for m in boundary.finditer(text) if m.end() >= max(min_chars, 1)]
        lo, hi, best = 0, len(ends) - 1, None  # the last end whose prefix fits (token counts grow with it)
        while lo <= hi:
            mid = (lo + hi) // 2
            if len(fitted := tokens(ends[mid])) <= room:
                best, lo = fitted, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best, True
    return ids[:room], True


def pair_row(pair: PreferencePair, tokenizer: GLMTokenizer, max_len: int, use_2d: bool,
             fmt: ChatFormat | None = None, min_chars: int = 0) -> tuple[dict, bool]:
    """The pair as one row of 2 x max_len: segment 1 chosen, segment 2 rejected (in the chat
    format `fmt`, default ChatGLM-6B's); a reply too long is cut by `fit_reply(min_chars)`.
    When the chosen reply is cut, the rejected one gets no more tokens than it kept: a length
    that cutting made says nothing about which side is better. Returns (row, whether a reply
    was cut)."""
    fmt = fmt or chat_format(CHATGLM_6B, tokenizer)
    prompt = prompt_ids(pair, fmt)
    room = reply_room(prompt, max_len)
    chosen, cut_c = fit_reply(pair.chosen, fmt, room, min_chars)
    rejected, cut_r = fit_reply(pair.rejected, fmt, len(chosen) if cut_c else room, min_chars)
    sides = [side_sample(prompt, reply, tokenizer, max_len, use_2d)[0] for reply in (chosen, rejected)]
    return pack_samples(sides, 2 * max_len, tokenizer.special.pad), cut_c or cut_r


def prompt_row(prompt: list[int], tokenizer: GLMTokenizer, max_prompt_len: int) -> dict:
    """Part A only: the prompt (cut from the left) + [gMASK], as one row of max_prompt_len."""
    part_a = prompt[-(max_prompt_len - 1):] + [tokenizer.special.gmask]
    n = len(part_a)
    sample = Sample()
    sample.extend(part_a, [-100] * n, range(n), [0] * n, [1] * n)
    return pack_samples([sample], max_prompt_len, tokenizer.special.pad)


def _log_source(log, name: str, stats: dict, made: str) -> None:
    log(f"[rlhf] {name}: {stats['rows_read']:,} rows, {made}, "
        f"{sum(stats['rejected'].values()):,} rejected {dict(stats['rejected']) or ''}")
    for example in stats["examples"]:
        log(f"[rlhf]   rejected {example}")
    stats["rejected"] = dict(stats["rejected"])


def _synthetic(cfg: PreferenceDataConfig, files: list, log):
    """(split, family, pair) of the synthetic pairs; their sources' stats; the families' stats."""
    chats, sources = [], {}
    for source, (fs, paths) in zip(cfg.synthetic.sources, files):
        stats = {"rows_read": 0, "chats": 0, "rejected": Counter(), "examples": []}
        parse = functools.partial(families.parse_chat, fmt=source.format)
        for line, chat in read_jsonl_rows(fs, paths, parse, stats, limit=cfg.max_samples):
            stats["chats"] += 1
            chats.append((split_of(line, cfg.validation_fraction), line, chat))
        _log_source(log, f"chats {source.name}", stats, f"{stats['chats']:,} chats kept")
        sources[source.name] = stats
    made = {f: {"pairs": 0, "skipped": 0, "rows": 0, "truncated": 0} for f in cfg.synthetic.families}
    pairs = []
    for split, family, chat, rejected in families.synthetic_pairs(chats, cfg.synthetic, cfg.seed):
        if not rejected:
            made[family]["skipped"] += 1
            continue
        made[family]["pairs"] += 1
        pairs.append((split, family, PreferencePair(chat.query, chat.reply, rejected, list(chat.history), chat.system)))
    log(f"[rlhf] synthetic pairs from {sum(s['chats'] for s in sources.values()):,} chats: "
        + ", ".join(f"{f} {m['pairs']:,} ({m['skipped']:,} chats skipped)" for f, m in made.items()))
    return pairs, sources, made


def prepare(cfg: PreferenceDataConfig, tokenizer: GLMTokenizer, *, layout: str, use_2d: bool, fingerprint: str,
            log=print, fmt: ChatFormat | None = None) -> dict:
    """Write pair rows (layout "pairs") or prompt rows ("prompts") in the chat format `fmt`
    (default ChatGLM-6B's) to cfg.output, reusing a complete output of the same fingerprint;
    returns the manifest."""
    fmt = fmt or chat_format(CHATGLM_6B, tokenizer)
    if (manifest := completed(cfg.output, fingerprint)) is not None:
        log(f"[rlhf] prepared {layout} for {fingerprint} exist at {cfg.output}: reusing them")
        return manifest
    if not cfg.sources and not cfg.synthetic.sources:
        raise ValueError("rlhf config: data.sources and data.synthetic.sources are empty: name at least one JSONL "
                         "file of preference pairs or of SFT chats")
    t0 = time.time()
    files = [storage.expand(s.uri) for s in cfg.sources]  # fails early on a missing input
    chat_files = [storage.expand(s.uri) for s in cfg.synthetic.sources]
    rows: dict[str, list[tuple[dict, str]]] = {"train": [], "validation": []}  # (row, family tag)
    seen_prompts: set[tuple[int, ...]] = set()
    min_chars = 4 * cfg.synthetic.truncated_chars

    def add(split: str, tag: str, pair: PreferencePair, stats: dict) -> None:
        if layout == "pairs":
            row, cut = pair_row(pair, tokenizer, cfg.max_len, use_2d, fmt, min_chars)
            stats["truncated"] += int(cut)
        else:
            row = prompt_row(prompt_ids(pair, fmt), tokenizer, cfg.max_prompt_len)
            key = tuple(row["input_ids"])
            if key in seen_prompts:
                return
            seen_prompts.add(key)
        rows[split].append((row, tag))
        stats["rows"] += 1

    sources = {}
    for source, (fs, paths) in zip(cfg.sources, files):
        stats = {"rows_read": 0, "pairs": 0, "rows": 0, "truncated": 0, "rejected": Counter(), "examples": []}
        parse = functools.partial(parse_pair, fmt=source.format)
        for line, pair in read_jsonl_rows(fs, paths, parse, stats, limit=cfg.max_samples):
            stats["pairs"] += 1
            add(split_of(line, cfg.validation_fraction), source.name, pair, stats)
        _log_source(log, source.name, stats, f"{stats['pairs']:,} pairs kept, {stats['rows']:,} {layout[:-1]} rows, "
                                              f"{stats['truncated']:,} responses cut")
        sources[source.name] = stats
    synthetic, chat_sources, made = _synthetic(cfg, chat_files, log)
    for split, family, pair in synthetic:
        add(split, family, pair, made[family])
    if not rows["train"]:
        raise ValueError(f"rlhf data: no usable pairs in {[s.uri for s in [*cfg.sources, *cfg.synthetic.sources]]} "
                         f"(rejected: {[s['rejected'] for s in [*sources.values(), *chat_sources.values()]]})")
    if not rows["validation"] and len(rows["train"]) > 1:
        rows["validation"].append(rows["train"].pop())

    for split, items in rows.items():
        random.Random(f"{cfg.seed}-{split}").shuffle(items)
    seq_len = 2 * cfg.max_len if layout == "pairs" else cfg.max_prompt_len
    manifest = write_prepared(cfg.output, {split: ([r for r, _ in items], len(items)) for split, items in rows.items()},
                              tokenizer, {
        "config_hash": fingerprint, "kind": f"rlhf_{layout}",
        "schema": {"columns": list(COLUMNS), "seq_len": seq_len,
                   "position_encoding": "rope_2d" if use_2d else "rope_1d", "extra": ["index"]},
        "sources": sources, "synthetic": {"sources": chat_sources, "families": made},
        "family_rows": {split: dict(Counter(tag for _, tag in items)) for split, items in rows.items()},
        "validation_families": [tag for _, tag in rows["validation"]]})
    splits = manifest["splits"]
    log(f"[rlhf] prepared {splits['train']['rows']:,} train and {splits['validation']['rows']:,} validation "
        f"{layout[:-1]} rows in {time.time() - t0:.1f}s -> {cfg.output}")
    return manifest

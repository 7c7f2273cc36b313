"""The chat protocol: how a conversation becomes the tokens a GLM model reads, and how its reply
is read back. One module for SFT formatting (and so its loss mask), RLHF prompts, `chat()` and
the serve endpoint's prompt builder and reply parser, so training and inference cannot drift.

Every reply is a Part-B span: Part A = `prompt(messages)` + [gMASK], then [sop] + the reply
(`reply(message)` when training), ended by [eop]. Two formats, chosen per model and recorded in
its inference checkpoint (config.json `metadata.chat_format`; absent = `chatglm_6b`):

- `chatglm_6b`: ChatGLM-6B's prompt, `[Round N]\\n问：{query}\\n答：{reply}\\n` per earlier round
  and `[Round N]\\n问：{query}\\n答：` for the open one; a first turn without history is the bare
  query. Roles: user and assistant; system messages open the first query (the format has no
  system role); no tools. Role markers are plain text, so a user can type them.
- `roles` (in the style of ChatGLM3): each message is a role token, a metadata line and the
  content: `<|role|>{metadata}\\n{content}`. The role tokens `<|system|>`, `<|user|>`,
  `<|assistant|>`, `<|observation|>` are special tokens that encoding text never produces
  (`GLMTokenizer.encode` spells them out as characters), so no message can pose as another
  role. System messages have empty metadata; the tool definitions are one system segment with
  metadata `tools` and their JSON (OpenAI function objects); an assistant answer has empty
  metadata; each tool call is an assistant segment whose metadata is the function name and
  whose content is the arguments JSON (several calls: consecutive segments); a tool result is an
  observation segment with the function's name as metadata. The prompt ends with
  `<|assistant|>`, so the reply starts with its metadata line. A reply ends with [eop]; the
  other role tokens stop generation too (`stop_ids`).

Tool call ids are transport, not text: they are not rendered; parsing numbers the calls
`call_0`, `call_1`, ... in conversation order and matches results to calls by position.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from glm.tokenizer import ROLE_TOKENS, GLMTokenizer

CHATGLM_6B, ROLES = "chatglm_6b", "roles"
FORMATS = (CHATGLM_6B, ROLES)
METADATA_KEY = "chat_format"
"""The config.json metadata field that records a checkpoint's chat format."""
ASSISTANT = ROLE_TOKENS[2]
"""`<|assistant|>`: in a reply's text, the start of another assistant segment (a further call)."""
TOOLS_METADATA = "tools"
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a function name may be (OpenAI's rule); it is a metadata line, so never a newline."""


class ChatFormatError(ValueError):
    """A conversation the chat format cannot render (names the message and what is wrong)."""


@dataclass
class ToolCall:
    name: str
    arguments: str = "{}"
    """The arguments as JSON text (as the model writes them; validity is not checked here)."""
    id: str = ""


@dataclass
class Message:
    role: str
    """system, user, assistant or tool."""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """An assistant message's function calls."""
    tool_call_id: str = ""
    """A tool message: the call it answers."""
    name: str = ""
    """A tool message: the function's name (found from tool_call_id when not given)."""


def from_openai(messages: Iterable[dict[str, Any]]) -> list[Message]:
    """OpenAI chat messages (dicts: role, content as text or text parts, tool_calls, tool_call_id,
    name) -> Messages; ChatFormatError naming the message that does not fit."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} is {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ChatFormatError(f"message {i} has role {role!r}; known: system, user, assistant, tool")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ChatFormatError(f"message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise ChatFormatError(f"message {i}: content is {type(content).__name__}, not text")
        calls = []
        for j, call in enumerate(m.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ChatFormatError(f"message {i}: tool call {j} has no function name")
            arguments = function.get("arguments", "{}")
            if not isinstance(arguments, str):  # some data sets store the arguments as an object
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append(ToolCall(function["name"], arguments, str(call.get("id") or "")))
        if calls and role != "assistant":
            raise ChatFormatError(f"message {i}: only assistant messages have tool_calls")
        out.append(Message(role, content or "", calls, str(m.get("tool_call_id") or ""),
                           str(m.get("name") or "") if role == "tool" else ""))
    return out


def to_openai(message: Message) -> dict[str, Any]:
    """An assistant Message in OpenAI's shape (content null when it only calls tools)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content or (None if message.tool_calls else "")}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in message.tool_calls]
    return out


# --- reading replies -------------------------------------------------------------------------


@dataclass
class ReplyDelta:
    """A piece of a reply as it is read: `content` text, or for tool call number `index` its
    `name` (when the call starts) and / or a chunk of its `arguments`."""

    content: str = ""
    index: int = -1
    name: str = ""
    arguments: str = ""


class ReplyParser:
    """Reads a reply's text as it is generated (streamed deltas add up to `parse_reply`).

    Without a separator (the ChatGLM-6B format) everything is content. In the role format the
    reply is segments split by the text of the `<|assistant|>` token, each a metadata line and a
    body: empty metadata -> content; a metadata line naming one of `tool_names` -> a tool call
    with the body as its arguments; anything else (a model that does not follow the format) is
    content as written. Text that may still become a header or a separator is held back.
    """

    def __init__(self, tool_names: Iterable[str] = (), separator: str | None = None):
        self.tool_names = set(tool_names)
        self.separator = separator
        self.calls = 0
        self._buf = ""
        self._state = "header" if separator else "content"

    def feed(self, text: str) -> list[ReplyDelta]:
        self._buf += text
        out: list[ReplyDelta] = []
        while self._buf:
            if self._state == "header":
                newline = self._buf.find("\n")
                if newline < 0:
                    if self._could_be_header(self._buf):
                        break
                    self._state = "content"
                    continue
                meta, body = self._buf[:newline], self._buf[newline + 1:]
                if meta == "":
                    self._state, self._buf = "content", body
                elif meta in self.tool_names:
                    out.append(ReplyDelta(index=self.calls, name=meta))
                    self.calls += 1
                    self._state, self._buf = "arguments", body
                else:
                    self._state = "content"
                continue
            cut = self._buf.find(self.separator) if self.separator else -1
            if cut >= 0:
                out.append(self._delta(self._buf[:cut]))
                self._buf, self._state = self._buf[cut + len(self.separator):], "header"
                continue
            held = _held_prefix(self._buf, self.separator) if self.separator else 0
            out.append(self._delta(self._buf[:len(self._buf) - held]))
            self._buf = self._buf[len(self._buf) - held:]
            break
        return [d for d in out if d.content or d.name or d.arguments]

    def finish(self) -> list[ReplyDelta]:
        """What was held back, at the end of the reply."""
        rest, self._buf = self._buf, ""
        if not rest:
            return []
        return [ReplyDelta(content=rest) if self._state == "header" else self._delta(rest)]

    def _could_be_header(self, text: str) -> bool:
        return any(name.startswith(text) for name in self.tool_names)

    def _delta(self, text: str) -> ReplyDelta:
        return ReplyDelta(index=self.calls - 1, arguments=text) if self._state == "arguments" else ReplyDelta(content=text)


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def collect(deltas: Iterable[ReplyDelta]) -> Message:
    """The assistant Message that a sequence of ReplyDeltas adds up to."""
    message = Message("assistant")
    for d in deltas:
        message.content += d.content
        if d.name:
            message.tool_calls.append(ToolCall(d.name, ""))
        if d.arguments:
            message.tool_calls[d.index].arguments += d.arguments
    return message


# --- the formats -----------------------------------------------------------------------------


class ChatFormat:
    """A chat format over one tokenizer (`chat_format(name, tokenizer)`)."""

    name = ""
    supports_tools = False

    def __init__(self, tokenizer: GLMTokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """The conversation as the model reads it as history."""
        raise NotImplementedError

    def prompt(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Part A (before [gMASK]) for the assistant's next reply; the messages end with a user
        (or, in the role format, tool) message."""
        raise NotImplementedError

    def reply(self, message: Message) -> list[int]:
        """An assistant message as the span the model writes (targets: these + [eop])."""
        raise NotImplementedError

    def parse(self, ids: list[int]) -> tuple[list[Message], list[dict]]:
        """`render`'s inverse: (messages, tools)."""
        raise NotImplementedError

    def parser(self, tool_names: Iterable[str] = ()) -> ReplyParser:
        """A reader for one generated reply's text."""
        return ReplyParser()

    def parse_reply(self, text: str, tool_names: Iterable[str] = ()) -> Message:
        """A whole generated reply -> the assistant Message (tool calls have no id yet)."""
        parser = self.parser(tool_names)
        return collect(parser.feed(text) + parser.finish())

    def stop_ids(self) -> list[int]:
        """Tokens besides [eop] that end a reply."""
        return []

    def turns(self, messages: list[Message], tools: list[dict] | None = None) -> list[tuple[list[int], list[int]]]:
        """(prompt, reply) token ids of every assistant message, each with the messages before it
        as history: what SFT trains (so only assistant turns, tool calls included, are targets)."""
        return [(self.prompt(messages[:i], tools), self.reply(m)) for i, m in enumerate(messages)
                if m.role == "assistant"]


class ChatGLM6BFormat(ChatFormat):
    name = CHATGLM_6B

    def _rounds(self, messages: list[Message]) -> tuple[list[tuple[str, str]], str | None]:
        """(complete rounds, the open query or None); system messages open the first query."""
        if any(m.role == "tool" or m.tool_calls for m in messages):
            raise ChatFormatError(f"the {self.name} chat format has no tools (no tool calls or tool messages); "
                                  f"a model in the '{ROLES}' format has")
        system = "\n".join(m.content for m in messages if m.role == "system")
        turns = [m for m in messages if m.role != "system"]
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise ChatFormatError(f"user and assistant turns must alternate; message {i} (after system "
                                      f"messages) has role {m.role!r}, expected {expected!r}")
        texts = [m.content for m in turns]
        if system and texts:
            texts[0] = f"{system}\n{texts[0]}"
        rounds = list(zip(texts[0::2], texts[1::2]))
        return rounds, texts[-1] if len(texts) % 2 else None

    def render(self, messages, tools=None):
        if tools:
            raise ChatFormatError(f"the {self.name} chat format has no tools")
        rounds, query = self._rounds(messages)
        if query is None:
            return self.tokenizer.encode("".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(rounds)))
        return self.tokenizer.encode(build_chat_prompt(query, rounds))

    def prompt(self, messages, tools=None):
        if not messages or self._rounds(messages)[1] is None:
            raise ChatFormatError("the last non-system message must have role 'user'")
        return self.render(messages, tools)

    def reply(self, message):
        if message.tool_calls:
            raise ChatFormatError(f"the {self.name} chat format has no tool calls")
        return self.tokenizer.encode(message.content.strip())

    def parse(self, ids):
        text = self.tokenizer.decode(ids)
        if not text.startswith("[Round 0]\n问："):
            return [Message("user", text)], []
        messages, k, start = [], 0, 0
        while start < len(text):
            marker = f"[Round {k}]\n问："
            end = text.find(f"\n[Round {k + 1}]\n问：", start)
            body = text[start + len(marker):len(text) if end < 0 else end + 1]
            if body.endswith("\n答：") and end < 0:
                messages.append(Message("user", body[:-len("\n答：")]))
                break
            query, _, answer = body.removesuffix("\n").partition("\n答：")
            messages += [Message("user", query), Message("assistant", answer)]
            start, k = (len(text) if end < 0 else end + 1), k + 1
        return messages, []


def build_chat_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
    """ChatGLM-6B's multi-round prompt; the first turn without history is the bare query."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


class RolesFormat(ChatFormat):
    name = ROLES
    supports_tools = True

    def __init__(self, tokenizer: GLMTokenizer):
        super().__init__(tokenizer)
        missing = [t for t in ROLE_TOKENS if t not in tokenizer.role_ids]
        if missing:
            raise ChatFormatError(
                f"the '{ROLES}' chat format needs the role tokens {', '.join(ROLE_TOKENS)} in the tokenizer; this "
                f"one lacks {', '.join(missing)} (ChatGLM-6B's vocabulary, or one trained before they were "
                f"reserved): use chat_format '{CHATGLM_6B}', or a tokenizer trained by this project's data stage")
        self.ids = {role: tokenizer.role_ids[token] for role, token in
                    zip(("system", "user", "assistant", "tool"), ROLE_TOKENS)}
        self._role_of = {i: role for role, i in self.ids.items()}

    def _segment(self, role: str, metadata: str, content: str) -> list[int]:
        return [self.ids[role]] + self.header(metadata) + self.tokenizer.encode(content)

    @staticmethod
    def header_text(metadata: str) -> str:
        """The metadata line: empty for an answer, a function name for a call."""
        return metadata + "\n"

    def header(self, metadata: str) -> list[int]:
        """The metadata line's tokens."""
        return self.tokenizer.encode(self.header_text(metadata))

    def render(self, messages, tools=None):
        ids: list[int] = []
        if tools:
            ids += self._segment("system", TOOLS_METADATA, json.dumps(tools, ensure_ascii=False))
        calls: list[ToolCall] = []  # of the conversation so far, for the names of tool results
        for i, m in enumerate(messages):
            if m.role == "assistant":
                for call in m.tool_calls:
                    if not FUNCTION_NAME.fullmatch(call.name):
                        raise ChatFormatError(f"message {i}: tool call name {call.name!r} is not a function name "
                                              f"(letters, digits, _ and -, at most 64)")
                calls += m.tool_calls
                ids += [self.ids["assistant"]] + self.reply(m)
            elif m.role == "tool":
                ids += self._segment("tool", self._result_name(i, m, calls), m.content)
            elif m.role in ("system", "user"):
                ids += self._segment(m.role, "", m.content)
            else:
                raise ChatFormatError(f"message {i} has role {m.role!r}; known: system, user, assistant, tool")
        return ids

    @staticmethod
    def _result_name(i: int, message: Message, calls: list[ToolCall]) -> str:
        named = [c.name for c in calls if message.tool_call_id and c.id == message.tool_call_id]
        name = named[0] if named else message.name
        if not name:
            raise ChatFormatError(f"message {i} (role tool): tool_call_id {message.tool_call_id!r} answers no "
                                  f"earlier tool call, and it has no name")
        if not FUNCTION_NAME.fullmatch(name):
            raise ChatFormatError(f"message {i} (role tool): {name!r} is not a function name")
        return name

    def prompt(self, messages, tools=None):
        if not messages or messages[-1].role not in ("user", "tool"):
            raise ChatFormatError("the last message must have role 'user' or 'tool'")
        return self.render(messages, tools) + [self.ids["assistant"]]

    def reply(self, message):
        parts = []
        if message.content or not message.tool_calls:
            parts.append(self.header("") + self.tokenizer.encode(message.content))
        parts += [self.header(c.name) + self.tokenizer.encode(c.arguments) for c in message.tool_calls]
        ids = parts[0]
        for part in parts[1:]:
            ids = ids + [self.ids["assistant"]] + part
        return ids

    def parse(self, ids):
        segments: list[tuple[str, list[int]]] = []
        for i in ids:
            if i in self._role_of:
                segments.append((self._role_of[i], []))
            elif not segments:
                raise ChatFormatError("text before the first role token")
            else:
                segments[-1][1].append(i)
        messages: list[Message] = []
        tools: list[dict] = []
        pending: list[ToolCall] = []
        n_calls, previous = 0, None
        for role, body in segments:
            metadata, _, content = self.tokenizer.decode(body).partition("\n")
            if role == "system" and metadata == TOOLS_METADATA:
                tools = json.loads(content)
            elif role == "assistant" and metadata:
                call = ToolCall(metadata, content, f"call_{n_calls}")
                n_calls += 1
                if previous == "assistant":
                    messages[-1].tool_calls.append(call)
                else:
                    messages.append(Message("assistant", tool_calls=[call]))
                pending.append(call)
            elif role == "tool":
                match = next((c for c in pending if c.name == metadata), pending[0] if pending else None)
                if match is not None:
                    pending.remove(match)
                messages.append(Message("tool", content, tool_call_id=match.id if match else "", name=metadata))
            else:
                messages.append(Message(role, content))
            previous = role
        return messages, tools

    def parser(self, tool_names=()):
        return ReplyParser(tool_names, separator=ASSISTANT)

    def stop_ids(self):
        return [self.ids[r] for r in ("system", "user", "tool")]


def chat_format(name: str, tokenizer: GLMTokenizer) -> ChatFormat:
    """The chat format `name` over `tokenizer` (ChatFormatError when the tokenizer cannot carry it)."""
    formats = {CHATGLM_6B: ChatGLM6BFormat, ROLES: RolesFormat}
    if name not in formats:
        raise ChatFormatError(f"unknown chat format {name!r}; known: {', '.join(FORMATS)}")
    return formats[name](tokenizer)


def from_metadata(metadata: dict[str, Any], tokenizer: GLMTokenizer) -> ChatFormat:
    """The chat format a checkpoint records (config.json metadata; absent = ChatGLM-6B's)."""
    return chat_format(metadata.get(METADATA_KEY) or CHATGLM_6B, tokenizer)

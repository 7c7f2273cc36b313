"""The OpenAI-compatible request bodies, OpenAI-style errors, and prompts in GLM's form.

Requests are pydantic models with OpenAI's ranges (unknown fields are refused by name, so a
typo never silently changes decoding; OpenAI parameters this server does not implement are
refused naming an alternative, `UNSUPPORTED`); `response_format` (`text`, `json_object`,
`json_schema`) asks for structured output (`stages.serve.structured`); `top_k`, `num_beams`,
`length_penalty`, `no_repeat_ngram_size`, `min_tokens`, `min_p`, `repetition_penalty` and
`stop_token_ids` are extensions (the last three as vLLM). Every failure becomes an `APIError`, answered as
`{"error": {"message", "type", "param", "code"}}` with its status code.

Ranges are chosen so that no accepted value can overflow or break decoding: the seed fits 64
bits unsigned, a temperature below `MIN_TEMPERATURE` decodes greedily (dividing logits by
1e-300 gives inf / NaN), penalties are finite, and strings must be valid Unicode (a lone
surrogate cannot be encoded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glm.chat_format import ChatFormat, ChatFormatError, Message, from_openai
from glm.generation import GenerationConfig, SpanQuery
from glm.tokenizer import GLMTokenizer
from stages.serve.structured import ANY_JSON_OBJECT


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MIN_TEMPERATURE = 0.01
"""A temperature in (0, MIN_TEMPERATURE) decodes greedily (what it approaches) instead of overflowing."""
MAX_STOPS, MAX_STOP_CHARS = 4, 256
SEED_MAX = 2**64 - 1
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS = 1024, 256
"""Entries per request: each is applied at every decode step of the request's row."""
_TOOLS = "tool calling is a chat feature: send tools to /v1/chat/completions (models in the 'roles' chat format)"
_FUNCTIONS = "deprecated by OpenAI and not implemented: send tools and tool_choice instead"
UNSUPPORTED = {
    "tools": _TOOLS, "tool_choice": _TOOLS, "parallel_tool_calls": _TOOLS,
    "functions": _FUNCTIONS, "function_call": _FUNCTIONS,
    "best_of": "ask for n choices and pick client-side, or use beam search (num_beams, an extension)",
    "suffix": "insert text with POST /v1/glm/fill: put a [MASK] where the insertion goes",
    "audio": "this model reads and writes text only", "modalities": "this model reads and writes text only",
    "prediction": "predicted outputs are not implemented: leave it out",
    "reasoning_effort": "this model has no hidden reasoning to configure: leave it out",
    "verbosity": "not implemented: ask for the length you want in the messages, or set max_tokens",
    "web_search_options": "this server has no web search: put the context in the messages",
    "store": "this server stores no completions: leave it out",
    "metadata": "this server stores no completions to attach metadata to: leave it out",
    "service_tier": "this server has a single tier: leave it out",
    "prompt_cache_key": "prompt caching is not implemented: leave it out",
    "prompt_cache_retention": "prompt caching is not implemented: leave it out",
}
"""OpenAI parameters this server does not implement -> what to do instead (a 400 names both).
Sent as null they ask for nothing and are accepted."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: Optional[Literal[False]] = None
    """Only off (no obfuscation padding is added to chunks)."""


def _check_unicode(value, where: str = "") -> None:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates such as "\\ud800" from JSON)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'a string'} contains a lone surrogate (not valid Unicode text)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, "a parameter name")
            _check_unicode(v, str(k) if isinstance(k, str) and k.isascii() else "")
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, where)


class _Body(BaseModel):
    """A request body: unknown fields are refused by name; strings must be valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        _check_unicode(data)
        return data


class JSONSchemaFormat(_Body):
    """`response_format.json_schema` (OpenAI's shape)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    """The JSON schema the answer must validate against (compiled by llguidance)."""
    description: Optional[str] = None
    strict: Optional[bool] = None
    """The schema is enforced whether strict or not (grammar-constrained decoding)."""


class ResponseFormat(_Body):
    """`response_format`: plain text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class _Request(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    user: Optional[str] = None
    """Logged with the request id (not used otherwise)."""
    safety_identifier: Optional[str] = None
    """OpenAI's newer name for `user`; logged the same way."""
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: Optional[dict[int, Bias]] = Field(None, max_length=MAX_LOGIT_BIAS)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    stop_token_ids: Optional[list[int]] = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    top_k: int = Field(0, ge=0)
    num_beams: int = Field(1, ge=1, le=8)
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False)
    no_repeat_ngram_size: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="before")
    @classmethod
    def _null_asks_for_nothing(cls, data):
        """An unsupported parameter sent as null is accepted as absent."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in UNSUPPORTED and v is None)}
        return data

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow (`{"type": "object"}` for json_object), or
        None for plain text; 400 for settings that cannot be combined with a grammar."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        self.check_constrainable("response_format", "structured output")
        return fmt.json_schema.schema_ if fmt.type == "json_schema" else ANY_JSON_OBJECT

    def check_constrainable(self, param: str, what: str) -> None:
        """400 for settings that cannot be combined with grammar-constrained decoding (`what`,
        asked for by `param`): beam search, min_tokens (the grammar decides where it ends)."""
        if self.num_beams > 1:
            raise APIError(400, f"{param}: {what} cannot be combined with beam search; leave num_beams out",
                           param=param)
        if self.min_tokens:
            raise APIError(400, f"{param}: min_tokens cannot be combined with {what} (the grammar decides where "
                                f"the answer ends); leave min_tokens out", param="min_tokens")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop sequences must be non-empty strings", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: a stop sequence may have at most {MAX_STOP_CHARS} characters, got "
                                f"{max(len(s) for s in stops)}", param="stop")
        return stops

    def check_ranges(self, vocab_size: int, context: int) -> None:
        """Ranges that depend on the served model: token ids and top_k within the vocabulary,
        n-gram size <= context."""
        for param, ids in (("logit_bias", list(self.logit_bias or ())), ("stop_token_ids", self.stop_token_ids or [])):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise APIError(400, f"{param}: {bad[0]} is not a token id of this model (0 to {vocab_size - 1})",
                               param=param)
        if self.top_k > vocab_size:
            raise APIError(400, f"top_k: at most the vocabulary size {vocab_size}, got {self.top_k}", param="top_k")
        if self.no_repeat_ngram_size > context:
            raise APIError(400, f"no_repeat_ngram_size: at most the context window {context}, got "
                                f"{self.no_repeat_ngram_size}", param="no_repeat_ngram_size")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprobs_count(self) -> int | None:
        """Top alternatives to report per token when logprobs are asked for; None when not."""
        return None

    def _checked_logprobs(self, count: int | None, param: str) -> int | None:
        if count is not None and self.num_beams > 1:
            raise APIError(400, f"{param}: logprobs are not available with beam search (it scores hypotheses, "
                                f"not tokens); leave num_beams out", param=param)
        return count

    def generation_config(self, max_new_tokens: int, default_temperature: float, default_top_p: float,
                          choice: int) -> GenerationConfig:
        """Decoding settings for choice number `choice` (seeds differ per choice: seed + choice)."""
        if self.num_beams > 1 and (self.temperature or 0) > 0:
            raise APIError(400, "num_beams > 1 is beam search, which does not sample: set temperature to 0 or "
                                "leave it out", param="num_beams")
        temperature = 0.0 if self.num_beams > 1 else (
            self.temperature if self.temperature is not None else default_temperature)
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # greedy: what sampling approaches as the temperature goes to 0
        if self.min_tokens > max_new_tokens:
            raise APIError(400, f"min_tokens {self.min_tokens} exceeds max_tokens {max_new_tokens}", param="min_tokens")
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=self.top_k,
            top_p=self.top_p if self.top_p is not None else (default_top_p if temperature > 0 else 1.0),
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            min_new_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=None if self.seed is None else (self.seed + choice) % (SEED_MAX + 1),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=dict(self.logit_bias or {}),
            min_p=self.min_p or 0.0,
        )


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCallParam(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """`developer` is OpenAI's newer name for `system` (rendered as system)."""
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallParam]] = None
    tool_call_id: Optional[str] = None


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


def chat_messages(messages: list[ChatMessage]) -> list[Message]:
    """The request's messages for `glm.chat_format` (400 naming what does not fit)."""
    if not messages:
        raise APIError(400, "messages: must contain at least one message", param="messages")
    raw = [m.model_dump(exclude_none=True) for m in messages]
    for m in raw:
        if m["role"] == "developer":
            m["role"] = "system"
    try:
        return from_openai(raw)
    except ChatFormatError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    """False: at most one tool call per reply (generation stops before a second)."""
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    """OpenAI's newer name for max_tokens (either may be given)."""
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        return self._checked_logprobs((self.top_logprobs or 0) if self.logprobs else None, "logprobs")


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    """A count (true is the chat form, refused here)."""

    def logprobs_count(self) -> int | None:
        if self.logprobs is not None and self.echo:
            raise APIError(400, "echo: the prompt has no logprobs to echo (GLM reads it bidirectionally as Part A, "
                                "it does not predict it); leave echo out or logprobs", param="echo")
        return self._checked_logprobs(self.logprobs, "logprobs")


class TokenizeRequest(_Body):
    """POST /v1/tokenize (vLLM's shape): `prompt`, or `messages` rendered as a chat prompt."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    """Append [gMASK] [sop], so `count` is what a completion or chat of this input reports as
    usage.prompt_tokens."""
    return_token_strs: bool = False

    def ids(self, tokenizer: GLMTokenizer, fmt: ChatFormat) -> list[int]:
        """The prompt's tokens, or the messages' chat prompt in the model's chat format."""
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give either prompt or messages (exactly one)", param="prompt")
        if self.prompt is not None:
            return tokenizer.encode(self.prompt)
        return chat_prompt(fmt, chat_messages(self.messages))


class DetokenizeRequest(_Body):
    """POST /v1/detokenize (vLLM's shape)."""

    model: Optional[str] = None
    tokens: list[int]

    def check(self, vocab_size: int) -> None:
        bad = [t for t in self.tokens if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"tokens: {bad[0]} is not a token id of this model (0 to {vocab_size - 1})",
                           param="tokens")


class FillRequest(_Request):
    """POST /v1/glm/fill: `text` with [MASK] / [sMASK] / [gMASK] ([gMASK] appended when none)."""

    model: Optional[str] = None
    text: str


def chat_prompt(fmt: ChatFormat, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
    """Part A (before [gMASK]) of the assistant's reply to `messages` in the model's chat format
    (`glm.chat_format`); a conversation the format cannot carry is a 400."""
    try:
        return fmt.prompt(messages, tools)
    except ChatFormatError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


@dataclass
class ToolPlan:
    """How a chat request's tools shape its prompt, decoding and reply parsing."""

    tools: list[dict] = field(default_factory=list)
    """Function definitions rendered into the prompt."""
    names: list[str] = field(default_factory=list)
    """Function names the reply parser reads as calls."""
    prefix_choices: list[list[int]] = field(default_factory=list)
    """Headers the reply must start with (`GenerationConfig.prefix_choices`)."""
    calls: dict[str, dict | None] = field(default_factory=dict)
    """The reply must be calls, each one of these headers (`name\\n`) followed by arguments
    valid under the function's parameters schema (None: none): the grammar
    `stages.serve.structured.tool_calls_lark` (empty: the reply is not constrained)."""
    parallel: bool = True
    """Several calls may follow each other (`parallel_tool_calls`)."""
    stop_ids: list[int] = field(default_factory=list)
    """Tokens that end the reply besides [eop] (the format's other roles; a second call when
    parallel_tool_calls is false)."""


def tool_plan(body: ChatCompletionRequest, fmt: ChatFormat) -> ToolPlan:
    """`tools`, `tool_choice` and `parallel_tool_calls` for a model in chat format `fmt`.

    `none`: the tools are left out of the prompt (as vLLM does) and the reply is forced to start
    as an answer; `auto`: the model chooses, unconstrained; `required` / a named function: the
    reply is calls (of any tool / of that one), each header and arguments enforced by a grammar
    (`calls`; one call when parallel_tool_calls is false).
    """
    plan = ToolPlan(stop_ids=fmt.stop_ids())
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice: needs tools (none were given)", param="tool_choice")
        return plan
    if not fmt.supports_tools:
        raise APIError(400, f"tools: this model's chat format {fmt.name!r} has no tool role (ChatGLM-6B's "
                            f"[Round N] prompt); tool calling needs a model fine-tuned in the 'roles' chat format",
                       param="tools", code="unsupported_parameter")
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    if choice == "none":
        plan.prefix_choices = [fmt.header("")]
        return plan
    plan.tools = [t.function.model_dump(exclude_none=True) for t in body.tools]
    plan.names = names
    plan.parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice: {choice.function.name!r} is not one of the tools ({', '.join(names)})",
                           param="tool_choice")
        plan.names = [choice.function.name]
    if choice == "required" or isinstance(choice, NamedToolChoice):
        body.check_constrainable("tool_choice", "a forced tool call (required or a named function)")
        plan.calls = {fmt.header_text(t.function.name): t.function.parameters for t in body.tools
                      if t.function.name in plan.names}
    if not plan.parallel:
        plan.stop_ids.append(fmt.ids["assistant"])
    return plan


def generation_query(tokenizer: GLMTokenizer, prompt: str | list[int]) -> SpanQuery:
    """Part A = the prompt (a text, or a chat prompt's tokens) + [gMASK]: generation continues
    it (control strings a user types in a chat or completion prompt, "[MASK]", "[eop]", ..., are
    encoded as plain text)."""
    ids = (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)) + [tokenizer.special.gmask]
    return SpanQuery(ids, len(ids) - 1, True)


def check_prompt_chars(text: str, context: int, max_piece_chars: int, param: str) -> None:
    """400 before tokenizing a text that cannot fit: every token covers at most
    `max_piece_chars` characters, so a longer text has more than `context` tokens."""
    if len(text) > context * max_piece_chars:
        raise APIError(400, f"prompt too long: {len(text)} characters is more than this model's context window "
                            f"of {context} tokens can hold", param=param, code="context_length_exceeded")


def max_new_tokens(requested: int | None, prompt_tokens: int, context: int, default: int,
                   param: str = "messages") -> int:
    """Tokens that may be generated after a Part A of `prompt_tokens` (mask included) plus [sop].

    A prompt that leaves no room, or an explicit max_tokens that does not fit, is a 400 that
    states the context window.
    """
    room = context - prompt_tokens - 1
    if room < 1:
        raise APIError(400, f"prompt too long: it is {prompt_tokens - 1} tokens (+ [gMASK] [sop]), and this model's "
                            f"context window is {context} tokens; shorten the prompt",
                       param=param, code="context_length_exceeded")
    if requested is None:
        return min(default, room)
    if requested > room:
        raise APIError(400, f"max_tokens {requested} does not fit: the prompt uses {prompt_tokens + 1} of this "
                            f"model's {context}-token context window, leaving {room}",
                       param="max_tokens", code="context_length_exceeded")
    return requested

"""The Ray Serve application: a FastAPI ingress around one continuous-batching DecodeEngine.

Routes (docs/serve.md): POST /v1/chat/completions, POST /v1/completions (both with SSE
streaming), POST /v1/glm/fill, POST /v1/tokenize, POST /v1/detokenize, GET /v1/models,
GET /health, GET /metrics (Prometheus, this replica's) and the web chat page at /.
`build_app(args)` is the import path for Serve config files; `stages.serve.stage.deploy`
runs it from Python.

Abuse handling: an ASGI guard checks the API key (any letter case of "Bearer") and the body
size (413 above `max_request_bytes`, from Content-Length or while the body streams in) before
FastAPI reads or parses anything; every answer that is not a success is an OpenAI error object,
rendered ASCII-only so no input (a lone surrogate, say) can break the error itself.
"""


import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm.chat_format import ASSISTANT, ReplyDelta, to_openai
from glm.config import from_dict
from glm.generation import GenerationConfig, SpanQuery, mask_positions, splice_span
from stages.serve.config import ServeConfig
from stages.serve.engine import EngineOverloaded, EngineStopped, SpanEvent, SpanRequest, TokenLogprob
from stages.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from stages.serve.protocol import (
    UNSUPPORTED, APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, FillRequest, TokenizeRequest,
    ToolPlan, chat_messages, chat_prompt, check_prompt_chars, generation_query, max_new_tokens, tool_plan,
)

logger = logging.getLogger("ray.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
OPEN_PATHS = ("/", "/health", "/metrics")
"""Routes that need no API key (the web page asks for the key itself; /metrics, like /health,
tells load, not content)."""
GUARD: dict[str, Any] = {"api_key": "", "max_request_bytes": 1_048_576, "max_inflight": 120, "inflight": 0,
                         "body_timeout_s": 30.0, "metrics": None}
"""The replica's key and body limit (set by GLMServer.__init__; one replica per process). Read
and written through `_guard()`; `metrics` is the replica's ServeMetrics, which counts every
answer, the guard's own included. Serve ships the deployment class and the app by value, each
with its own copy of this module's globals, so only the imported module is shared."""


def _guard() -> dict[str, Any]:
    import importlib

    return importlib.import_module("stages.serve.app").GUARD


class ErrorResponse(JSONResponse):
    """An OpenAI error object, ASCII-escaped (a lone surrogate echoed from the input cannot
    make rendering the error fail)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> ErrorResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return ErrorResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """ASGI middleware run before routing and body parsing: the replica's in-flight bound, the
    API key, then the body size and the time it takes to arrive."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        guard = _guard()
        if guard["metrics"] is not None:
            send = guard["metrics"].counting(_route(scope), send)
        if guard["inflight"] >= guard["max_inflight"]:
            # answered here, in our error shape, so Serve's own queue (plain-text answers) stays empty
            return await error_response(APIError(429, f"server overloaded: {guard['inflight']} requests in flight on "
                                                      f"this replica; retry later", type="server_error",
                                                 code="overloaded"))(scope, receive, send)
        error = self._check_headers(scope)
        if error is not None:
            return await error_response(error)(scope, receive, send)
        limit, seen, complete = guard["max_request_bytes"], 0, False
        deadline = time.monotonic() + guard["body_timeout_s"]

        async def limited_receive():
            nonlocal seen, complete
            if complete:  # after the body: disconnect notices, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {guard['body_timeout_s']:g}s") from None
            seen += len(message.get("body", b""))
            complete = message.get("type") != "http.request" or not message.get("more_body", False)
            if seen > limit:  # a streamed (chunked) body: FastAPI turns this into our 413 handler
                raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        guard["inflight"] += 1
        try:
            await self.app(scope, limited_receive, send)
        finally:
            guard["inflight"] -= 1

    @staticmethod
    def _check_headers(scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        guard = _guard()
        key = guard["api_key"]
        if key and _route(scope) not in OPEN_PATHS:
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return APIError(400, f"invalid Content-Length header {length[:40]!r}")
            if int(length) > guard["max_request_bytes"]:
                return APIError(413, f"request body of {int(length)} bytes is larger than this server's limit of "
                                     f"{guard['max_request_bytes']} bytes", code="request_too_large")
        return None


def _route(scope) -> str:
    """The request's path inside the application (without Serve's route prefix)."""
    root, path = scope.get("root_path", ""), scope.get("path", "")
    return (path[len(root):] if root and path.startswith(root) else path) or "/"


api = FastAPI(title="GLM", description="OpenAI-compatible GLM endpoint with GLM blank filling")
api.add_middleware(Guard)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's complaint as one OpenAI error naming the parameter (400, as OpenAI does)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    elif first.get("type") == "extra_forbidden" and param in UNSUPPORTED:
        return error_response(APIError(400, f"{param!r} is not supported by this server: {UNSUPPORTED[param]}",
                                       param=param, code="unsupported_parameter"))
    elif first.get("type") == "extra_forbidden":
        message = f"unknown parameter {param!r}"
    elif first.get("type") == "missing":
        message = f"missing required parameter {param!r}" if param else "missing request body"
    else:
        got = repr(first.get("input"))
        got = got if len(got) <= 200 else got[:200] + "..."
        message = f"{param}: {first.get('msg')} (got {got})" if param else str(first.get("msg"))
    return error_response(APIError(400, message, param=param))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "request_too_large" if exc.status_code == 413 else None
    return error_response(APIError(exc.status_code, str(exc.detail), code=code))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unforeseen: still an OpenAI error object (500), and the server keeps serving."""
    logger.exception("unexpected error in %s", request.url.path)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@serve.deployment(name="GLMServer")
@serve.ingress(api)
class GLMServer:
    """One replica: the model, its tokenizer and the decode loop."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from glm.chat_format import from_metadata
        from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config
        from stages.serve.engine import DecodeEngine
        from stages.serve.metrics import ServeMetrics

        self.config = from_dict(ServeConfig, config, where="serve config")
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        t0 = time.time()
        if self.config.tensor_parallel > 1:
            self.model, self.tokenizer = self._start_tensor_parallel()
            device = f"{self.config.tensor_parallel} tensor-parallel workers"
        else:
            self.model, self.tokenizer = load_inference_checkpoint(self.config.checkpoint, device=device, dtype=dtype)
        self.context = self.model.config.max_seq_len
        self.chat_format = from_metadata(read_checkpoint_config(self.config.checkpoint)[1], self.tokenizer)
        self.metrics = ServeMetrics(self.config.model_name, serve.get_replica_context().replica_id.unique_id)
        self.engine = DecodeEngine(self.model, self.tokenizer, self.config.max_batch_size, self.config.max_waiting,
                                   self.config.max_beam_requests, observer=self.metrics)
        self.metrics.watch(self.engine)
        self.grammars = None  # response_format's compiler, built on first use (`_grammars`)
        # in-flight bound a little under Serve's max_ongoing_requests: overload is answered by this
        # replica (JSON) before Serve would start queueing (and answering in plain text)
        _guard().update(api_key=self.config.api_key, max_request_bytes=self.config.max_request_bytes,
                        max_inflight=max(1, self.config.max_ongoing_requests - 8),
                        body_timeout_s=self.config.body_timeout_s, metrics=self.metrics)
        self.created = int(time.time())
        logger.info("GLM replica ready: %s on %s in %.1fs (context %d, max_batch_size %d, chat format %s)",
                    self.config.checkpoint, device, time.time() - t0, self.context, self.config.max_batch_size,
                    self.chat_format.name)

    def _start_tensor_parallel(self):
        """(TensorParallelModel, tokenizer): the checkpoint verified and fetched here once, then
        each worker reads its shard from that local copy (STRICT_PACK: the same node)."""
        from glm.checkpoint import verified_checkpoint
        from glm.tokenizer import GLMTokenizer
        from stages.serve.tensor_parallel import check_shardable, start_tensor_parallel

        size = self.config.tensor_parallel
        with verified_checkpoint(self.config.checkpoint) as (local, model_config, _, spec):
            check_shardable(model_config, spec, size, self.config.checkpoint)
            tokenizer = GLMTokenizer.load(local / GLMTokenizer.MODEL_FILE)
            dtype = None if self.config.dtype == "auto" else self.config.dtype
            model = start_tensor_parallel(local, model_config, size, self.config.device, dtype, self.config.num_gpus)
        return model, tokenizer

    def check_health(self) -> None:
        """Serve's periodic replica health check: a replica whose decode loop died, or whose
        tensor-parallel workers fell out of step, is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the decode loop is not running")
        if hasattr(self.model, "check"):
            self.model.check()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        if hasattr(getattr(self, "model", None), "close"):
            self.model.close()

    # --- helpers ---------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def _submit(self, jobs: list[tuple[SpanQuery, GenerationConfig]], stop: list[str],
                logprobs: int | None = None, grammar: str | None = None) -> tuple[list, asyncio.Queue]:
        """Queue every (query, config) (with `logprobs` top alternatives per token, or none;
        each job with its own matcher of `grammar`, or unconstrained); events arrive on one
        asyncio queue as (job index, event).

        All or nothing: when the engine refuses one, the ones already queued are cancelled and
        the client gets 429.
        """
        if len(jobs) > self.engine.capacity:
            raise APIError(400, f"this request needs {len(jobs)} generations (prompts x n) but a replica holds at most "
                                f"{self.engine.capacity} at once (max_batch_size + max_waiting); send fewer",
                           param="n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        try:
            for i, (query, config) in enumerate(jobs):
                def on_event(event: SpanEvent, i=i) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))
                matcher = None if grammar is None else self._grammars().matcher(grammar)
                requests.append(self.engine.submit(SpanRequest(query, config, on_event, stop, logprobs, matcher)))
        except (EngineOverloaded, EngineStopped) as e:
            for r in requests:
                self.engine.cancel(r)
            raise APIError(429 if isinstance(e, EngineOverloaded) else 503, str(e), type="server_error",
                           code="overloaded") from None
        return requests, events

    async def _events(self, requests: list, events: asyncio.Queue) -> AsyncIterator[tuple[int, SpanEvent]]:
        """(index, event) until every job is done; cancels the jobs when the consumer stops early."""
        pending = set(range(len(requests)))
        deadline = time.monotonic() + self.config.request_timeout_s
        try:
            while pending:
                try:
                    i, event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise APIError(503, f"generation took longer than request_timeout_s "
                                        f"({self.config.request_timeout_s:.0f}s)", type="server_error",
                                   code="timeout") from None
                if i not in pending:
                    continue  # a late duplicate after a job's final event
                if event.done:
                    pending.discard(i)
                    if event.error:
                        raise APIError(500, event.error, type="server_error")
                yield i, event
        finally:
            for r in requests:
                self.engine.cancel(r)  # no-op for finished jobs; stops work a dropped client no longer wants

    async def _finals(self, jobs, stop, logprobs: int | None = None,
                      grammar: str | None = None) -> tuple[list[SpanEvent], list[list[TokenLogprob]]]:
        """Each job's final event and all its token logprobs (empty lists when not asked for)."""
        requests, events = self._submit(jobs, stop, logprobs, grammar)
        finals: list[SpanEvent | None] = [None] * len(jobs)
        gathered: list[list[TokenLogprob]] = [[] for _ in jobs]
        # aclosing: when the client leaves mid-way, the generator's cleanup cancels the jobs now
        async with contextlib.aclosing(self._events(requests, events)) as stream:
            async for i, event in stream:
                gathered[i] += event.logprobs
                if event.done:
                    finals[i] = event
        return finals, gathered

    def _check(self, body, rid: str) -> None:
        """Validate what depends on the model or on several fields, before anything is queued;
        log the client's `user` with the request id."""
        body.stop_strings()
        body.check_ranges(len(self.tokenizer), self.context)
        body.logprobs_count()
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only with stream: true", param="stream_options")
        user = body.user or body.safety_identifier
        if user:
            logger.info("%s for user %r", rid, user[:256])

    def _grammars(self, param: str = "response_format"):
        """The replica's grammar compiler (built on first use: it reads the vocabulary); `param`
        is what asked for a grammar, named in the 400 when llguidance is not installed."""
        if self.grammars is None:
            from stages.serve.structured import Grammars

            try:
                self.grammars = Grammars(self.tokenizer)
            except RuntimeError as e:  # llguidance is not installed
                raise APIError(400, f"{param}: {e}", param=param, code="unsupported_parameter") from None
        return self.grammars

    def _grammar(self, body) -> str | None:
        """The compiled grammar of the body's response_format (None: plain text); 400 naming
        what is wrong when the schema cannot be compiled."""
        schema = body.response_schema()
        if schema is None:
            return None
        try:
            return self._grammars().compile(schema)
        except ValueError as e:
            raise APIError(400, f"response_format: the JSON schema cannot be used: {e}",
                           param="response_format.json_schema.schema") from None

    def _tool_grammar(self, plan: ToolPlan) -> str:
        """The compiled grammar of the calls a reply must consist of (tool_choice required or a
        named function): after each call's arguments the reply ends, or (parallel calls) goes
        on with the next `<|assistant|>` segment; 400 naming a function whose parameters schema
        cannot be compiled."""
        separator = ASSISTANT if plan.parallel else None
        try:
            return self._grammars("tool_choice").compile_tool_calls(plan.calls, separator)
        except ValueError as e:
            raise APIError(400, f"tools: {e}", param="tools") from None

    def _prepare(self, body, prompts: list[str] | list[list[int]], param: str, rid: str,
                 plan: ToolPlan | None = None) -> tuple[list[tuple[SpanQuery, GenerationConfig]], int]:
        """Jobs (prompt x n choices) with their decoding settings, and the prompt token count.
        Prompts are texts (checked for length before encoding) or a chat prompt's tokens."""
        self._check(body, rid)
        for prompt in prompts:
            if isinstance(prompt, str):
                check_prompt_chars(prompt, self.context, self.tokenizer.max_piece_chars, param)
        jobs, prompt_tokens = [], 0
        for prompt in prompts:
            query = generation_query(self.tokenizer, prompt)
            limit = max_new_tokens(body.max_tokens, len(query.part_a), self.context, self.config.default_max_tokens,
                                   param)
            prompt_tokens += len(query.part_a) + 1  # text, [gMASK], [sop]
            for choice in range(body.n):
                config = body.generation_config(limit, self.config.default_temperature, self.config.default_top_p,
                                                choice)
                if plan is not None:
                    config = dataclasses.replace(config, stop_token_ids=config.stop_token_ids + plan.stop_ids,
                                                 prefix_choices=plan.prefix_choices)
                jobs.append((query, config))
        return jobs, prompt_tokens

    def _stream(self, kind: str, rid: str, body, jobs, prompt_tokens: int,
                echo: list[str] | None = None, grammar: str | None = None,
                plan: ToolPlan | None = None) -> StreamingResponse:
        """SSE in OpenAI's chunk format; `kind` is 'chat' or 'text'. Each chunk carries the
        logprobs of the tokens whose text it brings (when asked for). Chat replies go through
        the chat format's reply parser: content deltas, and tool calls as OpenAI's tool_calls
        deltas (id, type and name when a call starts, then argument chunks)."""
        logprobs = body.logprobs_count()
        requests, events = self._submit(jobs, body.stop_strings(), logprobs, grammar)
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": obj, "created": int(time.time()), "model": self.config.model_name}
        offsets = [TextOffsets() for _ in jobs]
        parsers = [self.chat_format.parser(plan.names if plan else ()) for _ in jobs]

        def chat_delta(deltas: list[ReplyDelta]) -> dict:
            delta, calls = {}, {}
            content = "".join(d.content for d in deltas)
            if content:
                delta["content"] = content
            for d in deltas:
                if d.name:
                    calls[d.index] = {"index": d.index, "id": _call_id(), "type": "function",
                                      "function": {"name": d.name, "arguments": ""}}
                if d.arguments:
                    call = calls.setdefault(d.index, {"index": d.index, "function": {"arguments": ""}})
                    call["function"]["arguments"] += d.arguments
            if calls:
                delta["tool_calls"] = list(calls.values())
            return delta

        def choice(i: int, text: str | None, finish: str | None, first: bool = False,
                   tokens: list[TokenLogprob] | None = None) -> dict | None:
            scores = None
            if tokens:
                scores = (chat_logprobs(self.tokenizer, tokens) if kind == "chat"
                          else completion_logprobs(self.tokenizer, tokens, offsets[i]))
            if kind == "chat":
                if first:
                    delta = {"role": "assistant", "content": ""}
                else:
                    delta = chat_delta(parsers[i].feed(text or "") + (parsers[i].finish() if finish else []))
                    if not (delta or finish or scores):
                        return None  # text held back by the parser (a header or a separator may follow)
                if finish == "stop" and parsers[i].calls:
                    finish = "tool_calls"
                return {**base, "choices": [{"index": i, "delta": delta, "logprobs": scores, "finish_reason": finish}]}
            return {**base, "choices": [{"index": i, "text": text or "", "logprobs": scores, "finish_reason": finish}]}

        async def body_iter() -> AsyncIterator[str]:
            completion_tokens = 0
            if kind == "chat":
                for i in range(len(jobs)):
                    yield _sse(choice(i, None, None, first=True))
            elif echo:
                for i, prompt in enumerate(echo):
                    yield _sse(choice(i, prompt, None))
            try:
                async with contextlib.aclosing(self._events(requests, events)) as stream:
                    async for i, event in stream:
                        if event.delta or event.done:
                            chunk = choice(i, event.delta, event.finish_reason if event.done else None,
                                           tokens=event.logprobs)
                            if chunk is not None:
                                yield _sse(chunk)
                        completion_tokens += len(event.tokens)
            except APIError as e:  # headers are sent: report in-band, as OpenAI's servers do
                yield _sse(e.body())
                return
            if body.include_usage():
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield _sse({**base, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return StreamingResponse(body_iter(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _usage(prompt_tokens: int, finals: list[SpanEvent]) -> dict:
        completion = sum(len(f.tokens) for f in finals)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    # --- routes ----------------------------------------------------------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        body.max_tokens = body.max_tokens or body.max_completion_tokens
        messages = chat_messages(body.messages)
        text = "".join(m.content + "".join(c.name + c.arguments for c in m.tool_calls) for m in messages)
        check_prompt_chars(text, self.context, self.tokenizer.max_piece_chars, "messages")
        plan = tool_plan(body, self.chat_format)
        prompt = chat_prompt(self.chat_format, messages, plan.tools)
        grammar = self._grammar(body)
        if grammar is not None and plan.tools:
            raise APIError(400, "response_format cannot be combined with tools: leave one out (a tool's arguments "
                                "follow its own parameters schema)", param="response_format")
        if plan.calls:
            grammar = self._tool_grammar(plan)
        jobs, prompt_tokens = self._prepare(body, [prompt], "messages", rid, plan)
        if body.stream:
            return self._stream("chat", rid, body, jobs, prompt_tokens, grammar=grammar, plan=plan)
        logprobs = body.logprobs_count()
        finals, scores = await self._finals(jobs, body.stop_strings(), logprobs, grammar)
        choices = []
        for i, f in enumerate(finals):
            reply = self.chat_format.parse_reply(f.text, plan.names)
            for call in reply.tool_calls:
                call.id = _call_id()
            finish = "tool_calls" if reply.tool_calls and f.finish_reason == "stop" else f.finish_reason
            choices.append({"index": i, "message": to_openai(reply),
                            "logprobs": None if logprobs is None else chat_logprobs(self.tokenizer, scores[i]),
                            "finish_reason": finish})
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.config.model_name,
            "choices": choices, "usage": self._usage(prompt_tokens, finals),
        }

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > 16:
            raise APIError(400, f"prompt: give 1 to 16 prompts, got {len(prompts)}", param="prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs, prompt_tokens = self._prepare(body, prompts, "prompt", rid)
        grammar = self._grammar(body)
        echo = [p for p in prompts for _ in range(body.n)] if body.echo else None
        if body.stream:
            return self._stream("text", rid, body, jobs, prompt_tokens, echo, grammar)
        logprobs = body.logprobs_count()
        finals, scores = await self._finals(jobs, body.stop_strings(), logprobs, grammar)
        return {
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": self.config.model_name,
            "choices": [{"index": i, "text": (echo[i] if echo else "") + f.text,
                         "logprobs": None if logprobs is None else completion_logprobs(self.tokenizer, scores[i],
                                                                                       TextOffsets()),
                         "finish_reason": f.finish_reason} for i, f in enumerate(finals)],
            "usage": self._usage(prompt_tokens, finals),
        }

    @api.post("/v1/glm/fill")
    async def fill(self, body: FillRequest, request: Request):
        """GLM blank filling, masks left to right (as `glm.generation.fill_blanks`)."""
        self._check_model(body.model)
        if body.stream or body.n != 1:
            raise APIError(400, "/v1/glm/fill supports neither stream nor n > 1", param="stream" if body.stream else "n")
        if body.response_format is not None:
            raise APIError(400, "/v1/glm/fill does not support response_format (use /v1/chat/completions or "
                                "/v1/completions)", param="response_format")
        rid = f"fill-{uuid.uuid4().hex}"
        self._check(body, rid)
        stop = body.stop_strings()
        check_prompt_chars(body.text, self.context, self.tokenizer.max_piece_chars, "text")
        special = self.tokenizer.special
        ids, masks = self.tokenizer.encode_with_masks(body.text)  # the one route where mask strings are masks
        if not masks:
            ids.append(special.gmask)
            masks = 1
        per_mask = self._fill_budget(body.max_tokens, len(ids), masks)
        config = body.generation_config(per_mask, self.config.default_temperature, self.config.default_top_p, 0)
        prompt_tokens, spans, finals = len(ids) + 1, [], []
        todo = mask_positions(ids, special)
        while todo:  # each of the text's own masks exactly once (a generated mask token is text)
            j = todo[0]
            [final], _ = await self._finals([(SpanQuery(ids, j, ids[j] == special.gmask), config)], stop)
            ids, todo = splice_span(ids, todo, final.tokens)
            spans.append(final.text)
            finals.append(final)
        return {
            "id": rid, "object": "glm.fill", "created": int(time.time()),
            "model": self.config.model_name, "text": self.tokenizer.decode(ids), "spans": spans, "masks": masks,
            "usage": self._usage(prompt_tokens, finals),
        }

    def _fill_budget(self, requested: int | None, text_tokens: int, masks: int) -> int:
        """Tokens per mask such that every span fits the context however long the earlier ones
        were: text + masks x max_tokens + [sop] <= context. Checked before generating anything."""
        max_new_tokens(None, text_tokens, self.context, 1, "text")  # the text alone must leave room
        room = self.context - text_tokens - 1
        if requested is None:
            per_mask = min(self.config.default_max_tokens, room // masks)
            if per_mask < 1:
                raise APIError(400, f"text too long to fill: {text_tokens} tokens with {masks} masks leave no room "
                                    f"in this model's {self.context}-token context window", param="text",
                               code="context_length_exceeded")
            return per_mask
        if text_tokens + masks * requested + 1 > self.context:
            raise APIError(400, f"{masks} masks x max_tokens {requested} do not fit: the text uses {text_tokens} of "
                                f"this model's {self.context}-token context window, leaving {room} "
                                f"({room // masks} per mask)", param="max_tokens", code="context_length_exceeded")
        return requested

    @api.post("/v1/tokenize")
    async def tokenize(self, body: TokenizeRequest):
        """vLLM's shape: {count, max_model_len, tokens, token_strs}."""
        self._check_model(body.model)
        ids = body.ids(self.tokenizer, self.chat_format)
        if body.add_special_tokens:
            ids += [self.tokenizer.special.gmask, self.tokenizer.special.sop]
        strs = [self.tokenizer.id_to_piece(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids, "token_strs": strs}

    @api.post("/v1/detokenize")
    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        body.check(len(self.tokenizer))
        return {"prompt": self.tokenizer.decode(body.tokens)}

    @api.get("/metrics")
    async def metrics_page(self):
        from stages.serve.metrics import CONTENT_TYPE

        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models(self, request: Request):
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self.created,
                                            "owned_by": "glm-pipeline", "context_window": self.context,
                                            "chat_format": self.chat_format.name,
                                            "tools": self.chat_format.supports_tools}]}

    @api.get("/health")
    async def health(self):
        if not self.engine.alive:
            raise APIError(503, "the decode loop is not running", type="server_error")
        return {"status": "ok", "model": self.config.model_name, **self.engine.load}

    @api.get("/", response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files (`import_path: stages.serve.app:build_app`);
    `args` are ServeConfig fields. The file's `deployments:` section overrides these options."""
    config = from_dict(ServeConfig, dict(args), where="serve application args")
    if not config.checkpoint:
        raise ValueError("serve application args: 'checkpoint' (an inference checkpoint directory or URI) is required")
    from ray.serve.config import BackpressureConfig

    config.check_exposure()
    placement = {}
    if config.tensor_parallel > 1:  # the workers hold the devices; the replica only its CPU
        placement = {"placement_group_bundles": config.placement_bundles(), "placement_group_strategy": "STRICT_PACK"}
    return GLMServer.options(
        num_replicas=config.num_replicas,
        ray_actor_options={"num_cpus": config.num_cpus,
                           "num_gpus": config.num_gpus if config.tensor_parallel == 1 else 0},
        **placement,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        max_constructor_retry_count=2,  # a replica that cannot load its checkpoint will not on a 20th try
        # Serve's own overflow (its body is plain text; Ray Serve does not let apps shape it):
        # at least the status and Retry-After match the replica's own overload answer
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
    ).bind(config.to_dict())

"""The OpenAI-compatible HTTP API over one :class:`~moeport.runtime.engine.Engine` (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics``. Chat answers carry DeepSeek's split: the reasoning in ``reasoning_content`` (in
messages and in stream deltas), the answer in ``content``. Every error is OpenAI's error object with a
status: 400 bad input, 401 bad API key, 404 unknown model or route, 405 wrong method, 413 body too large,
429 queue full (with ``Retry-After``), 503 shutting down, 500 a request that failed inside the model (only
that request).

Extension (vLLM's): ``return_token_ids: true`` adds each choice's generated ``token_ids`` (in stream
chunks too), e.g. for models without a tokenizer, whose completions have no text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..engine import ChoiceEvent, Engine, EngineClosed, EngineRequest, InvalidRequest, QueueFull
from ..generate import GenerationError
from ..sampling import SamplingError, SamplingParams, TokenLogprob
from ..text import TextError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("moeport.server")

MAX_BODY_BYTES = 16 << 20
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "abort"}
_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


@dataclass
class ServerState:
    model: Any
    engine: Engine
    name: str
    api_key: str | None = None
    metrics: Metrics | None = None
    closing: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    tool_call_parser: str | None = None  # deepseek_v3 | deepseek_v31; None: read off the chat template


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on /v1 (a plain ASGI middleware: it leaves streaming bodies and
    client-disconnect messages untouched, unlike Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                error = ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app serving ``state.engine`` under the model name ``state.name``."""
    app = FastAPI(title="moeport", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.moeport = state
    if state.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=state.api_key)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return exc.response(headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        error = ApiError(exc.status_code, message, _STATUS_TYPES.get(exc.status_code, "invalid_request_error"))
        return error.response(dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.exception("internal error")
        return ApiError(500, f"internal error ({type(exc).__name__})", "internal_error").response()

    @app.get("/health")
    async def health():
        if state.closing or not state.engine.alive:
            return JSONResponse({"status": "shutting down" if state.closing else "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            raise ApiError(404, "metrics are off")
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": state.name,
            "object": "model",
            "created": state.created,
            "owned_by": "moeport",
            "max_model_len": state.model.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        _check_model(state, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        shape = _structure(state, body)
        ids = _chat_prompt(state.model, body, shape)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(state, body, len(ids), max_tokens, logprobs)
        return await _run(request, state, "chat", body, ids, params, shape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        _check_model(state, body.model)
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        ids = _completion_prompt(state.model, body.prompt)
        params = _params(state, body, len(ids), body.max_tokens, body.logprobs)
        return await _run(request, state, "completion", body, ids, params)

    return app


# -- request parsing ------------------------------------------------------------------------------------------


async def _parse(request: Request, kind: type[BaseModel]) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES >> 20} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: a chunked body has no content-length
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, data) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None


_MEMBERS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "list[str]": "an array of strings",
    "list[int]": "an array of integers",
    "list[ContentPart]": "an array of content parts",
    "dict[str,any]": "an object",
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in ((dict, "an object"), (list, "an array"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, float) else "null"


def _walk(data: Any, loc: tuple, missing: bool) -> tuple[list, int | None, str | None]:
    """A pydantic error location as a path into the body as sent. Pydantic also puts the name of the union
    member it tried into the location (``temperature.int``): returns (path, how many path elements precede
    that name, the name), or (path, None, None) outside unions."""
    path: list = []
    node, at, member = data, None, None
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1):  # (else: the missing field itself)
            if member is None:
                at, member = len(path), str(part)
            continue
        path.append(part)
    return path, at, member


def _value_at(data: Any, path: list) -> Any:
    for part in path:
        data = data[part]
    return data


def _invalid(exc: ValidationError, data: dict) -> ApiError:
    """One line naming the field as the client sent it: ``temperature: expected a number, got a string``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    missing = first["type"] == "missing"
    path, at, member = _walk(data, first["loc"], missing)
    if member is None or at is None:
        param = ".".join(str(p) for p in path) or None
        value = None if missing else _value_at(data, path)
        got = "" if missing or isinstance(value, (dict, list)) else f" (got {json.dumps(value)[:60]})"
        return ApiError(400, f"{param}: {first['msg']}{got}" if param else first["msg"], param=param)
    field_path = path[:at]
    param = ".".join(str(p) for p in field_path) or None
    expected: list[str] = []
    for e in errors:  # every member of the union tried at this field
        p, a, m = _walk(data, e["loc"], e["type"] == "missing")
        if m is not None and a == at and p[:a] == field_path:
            name = _MEMBERS.get(m, m)
            if name not in expected:
                expected.append(name)
    got = _json_kind(_value_at(data, field_path))
    return ApiError(400, f"{param}: expected {' or '.join(expected)}, got {got}", param=param)


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist (this server has {state.name!r})",
            param="model",
            code="model_not_found",
        )


@dataclass(frozen=True)
class _Shape:
    """What a chat request asks of its output: a constraint, and whether tool calls are parsed from it."""

    response_format: Any = None  # for the engine (a JSON schema, or the grammar forcing a tool call)
    tool_format: str | None = None  # deepseek_v3 | deepseek_v31 when tools are offered


def _structure(state: ServerState, body: ChatCompletionRequest) -> _Shape:
    """``response_format`` and ``tools``/``tool_choice`` checked and turned into a constraint (400s name the
    field): tools need a chat template that renders DeepSeek tool calls (or --tool-call-parser)."""
    from ..constraints import ConstraintError, check_response_format
    from ..tool_calls import ToolCallError, resolve_tool_choice, tool_call_format, tool_call_response_format

    fmt = body.response_format
    if fmt is not None:
        try:
            check_response_format(fmt)
        except ConstraintError as exc:
            raise ApiError(400, f"response_format: {exc}", param="response_format") from None
        if fmt.get("type") == "text":
            fmt = None
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return _Shape(fmt)
    tok = state.model.tokenizer
    if tok is None:
        raise ApiError(400, "tools need the model's tokenizer and chat template", param="tools")
    try:
        from ..tool_calls import check_tools

        choice = resolve_tool_choice(body.tool_choice, check_tools(body.tools))
        if choice == "none":
            return _Shape(fmt)
        tool_format = tool_call_format(tok, state.tool_call_parser)
        forced = tool_call_response_format(
            body.tools, body.tool_choice, tool_format, tok, parallel_tool_calls=body.parallel_tool_calls
        )
    except ToolCallError as exc:
        param = "tool_choice" if "tool_choice" in str(exc) else "tools"
        raise ApiError(400, str(exc), param=param) from None
    if forced is not None and fmt is not None:
        raise ApiError(400, "response_format cannot be combined with a forced tool call", param="response_format")
    return _Shape(forced or fmt, tool_format)


def _check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"{param}: not valid Unicode ({exc.reason} at character {exc.start})"
        raise ApiError(400, message, param=param) from None
    return text


def _chat_prompt(model: Any, body: ChatCompletionRequest, shape: _Shape) -> list[int]:
    if model.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: use /v1/completions with token ids")
    messages = []
    uses_tools = shape.tool_format is not None
    for i, m in enumerate(body.messages):
        if m.role == "tool" or m.tool_calls:
            uses_tools = True
        where = f"messages.{i}.content"
        if m.content is None and m.role != "assistant":
            raise ApiError(400, f"{where}: a {m.role} message needs content", param=where)
        try:
            text = _check_text(m.text(), f"messages.{i}.content")
        except ValueError as exc:
            raise ApiError(400, f"messages.{i}.content: {exc}", param=f"messages.{i}.content") from None
        if m.role == "assistant" and "</think>" in text:  # DeepSeek: earlier reasoning is not sent back
            text = text.split("</think>")[-1].lstrip()
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": text}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = m.tool_calls
            message["content"] = text or None
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    if not uses_tools:
        try:
            return model.chat_ids(messages)
        except TextError as exc:
            raise ApiError(400, str(exc), param="messages") from None
    from ..tool_calls import ToolCallError, render_chat

    tools = body.tools if shape.tool_format is not None else None
    try:
        text = render_chat(model.tokenizer, messages, tools, parser=shape.tool_format)
    except (ToolCallError, TextError) as exc:
        raise ApiError(400, str(exc), param="tools" if body.tools else "messages") from None
    return model.tokenizer.encode(text, add_special_tokens=False)


def _completion_prompt(model: Any, prompt: str | list) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request (a list of several prompts is not supported)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if prompt == "":
            raise ApiError(400, "empty prompt", param="prompt")
        tok = model.tokenizer
        if tok is None:
            raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", param="prompt")
        has_bos = bool(tok.bos_token) and prompt.startswith(tok.bos_token)
        return tok.encode(_check_text(prompt, "prompt"), add_special_tokens=not has_bos)
    return list(prompt)


def _params(state: ServerState, body: Any, prompt_len: int, max_tokens: int | None, logprobs: int | None):
    limit = state.model.max_seq_len
    overrides: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": None if body.top_k is None else max(body.top_k, 0),
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": tuple(body.stop or ()),
        "ignore_eos": body.ignore_eos or None,
        "logprobs": logprobs,
    }
    if max_tokens is None:  # as much as the context leaves, stopping cleanly when it is full
        overrides.update(max_new_tokens=max(limit - prompt_len, 1), on_context_limit="stop")
    else:
        overrides.update(max_new_tokens=max_tokens, on_context_limit="error")
    try:
        return state.model.sampling_params(**overrides)
    except SamplingError as exc:
        raise ApiError(400, str(exc)) from None


# -- running ---------------------------------------------------------------------------------------------------


class _Bridge:
    """Engine events (engine thread) -> an asyncio queue (the request's event loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()

    def __call__(self, event: ChoiceEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class _Choice:
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    error: Exception | None = None


async def _cancel_on_disconnect(request: Request, handle: EngineRequest) -> None:
    """Cancel ``handle`` when the client goes away (a non-streamed request: nothing is sent until the end,
    so only the connection tells). After the body, the server's next message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _run(
    request: Request,
    state: ServerState,
    kind: str,
    body: Any,
    ids: list[int],
    params: SamplingParams,
    shape: _Shape | None = None,
):
    if state.closing:
        raise ApiError(503, "the server is shutting down", "service_unavailable")
    shape = shape or _Shape()
    bridge = _Bridge()
    try:
        handle = state.engine.submit(ids, params, body.n, on_event=bridge, response_format=shape.response_format)
    except QueueFull as exc:
        raise ApiError(429, f"server busy: {exc}", "rate_limit_exceeded") from None
    except EngineClosed as exc:
        raise ApiError(503, str(exc), "service_unavailable") from None
    except InvalidRequest as exc:
        param = "messages" if exc.param == "prompt" and kind == "chat" else exc.param
        raise ApiError(400, str(exc), param=param) from None
    except GenerationError as exc:
        raise ApiError(400, str(exc)) from None
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(
            _stream(state, kind, rid, handle, bridge, include_usage, body.return_token_ids, shape.tool_format),
            ping=15,
            send_timeout=60,
            sep="\n",
        )
    choices = [_Choice() for _ in range(body.n)]
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    try:
        while not all(c.finish is not None for c in choices):
            _absorb(choices[(event := await bridge.queue.get()).index], event)
    finally:
        watcher.cancel()
        if not handle.done:
            handle.cancel()
    if watcher.done() and not watcher.cancelled():  # the client is gone: nobody reads an answer
        return Response(status_code=499)
    failed = next((c.error for c in choices if c.error is not None), None)
    if failed is not None:
        raise ApiError(500, f"the model failed on this request: {failed}", "internal_error")
    return _response(state, kind, rid, handle, choices, body.return_token_ids, shape.tool_format)


def _absorb(c: _Choice, event: ChoiceEvent) -> None:
    for d in event.deltas:
        (c.reasoning if d.part == "reasoning" else c.content).append(d.text)
    c.text.append(event.text)
    c.tokens.extend(event.tokens)
    c.logprobs.extend(event.logprobs)
    if event.finish_reason is not None:
        c.finish = FINISH.get(event.finish_reason, event.finish_reason)
        c.error = event.error


def _usage(handle: EngineRequest) -> dict[str, Any]:
    completion = handle.completion_tokens
    reasoning = sum(c.reasoning_tokens for c in handle.choices)
    return {
        "prompt_tokens": len(handle.prompt),
        "completion_tokens": completion,
        "total_tokens": len(handle.prompt) + completion,
        "prompt_tokens_details": {"cached_tokens": handle.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _token_text(model: Any, token: int) -> str:
    tok = model.tokenizer
    return tok.decode([token], skip_special_tokens=False) if tok is not None else str(token)


def _chat_logprobs(model: Any, items: list[TokenLogprob]) -> dict[str, Any] | None:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(model, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]
    }


def _completion_logprobs(model: Any, items: list[TokenLogprob]) -> dict[str, Any]:
    texts = [_token_text(model, i.token) for i in items]
    return {
        "tokens": texts,
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{_token_text(model, t): lp for t, lp in i.top} for i in items],
    }


def _response(
    state: ServerState,
    kind: str,
    rid: str,
    handle: EngineRequest,
    choices: list[_Choice],
    token_ids: bool,
    tool_format: str | None = None,
) -> dict:
    model = state.model
    want_logprobs = handle.params.logprobs is not None
    out = []
    for i, c in enumerate(choices):
        if kind == "chat":
            reasoning = "".join(c.reasoning).strip()
            content: str | None = "".join(c.content).strip()
            message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
            finish = c.finish
            if tool_format is not None:
                from ..tool_calls import parse_tool_calls

                parsed = parse_tool_calls(content, tool_format)
                if parsed.tool_calls:
                    message["content"] = parsed.content or None
                    message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
                    finish = "tool_calls" if finish == "stop" else finish
            logprobs = _chat_logprobs(model, c.logprobs) if want_logprobs else None
            choice = {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            logprobs = _completion_logprobs(model, c.logprobs) if want_logprobs else None
            choice = {"index": i, "text": "".join(c.text), "logprobs": logprobs, "finish_reason": c.finish}
        if token_ids:
            choice["token_ids"] = c.tokens
        out.append(choice)
    doc = {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": state.name,
        "choices": out,
        "usage": _usage(handle),
    }
    if token_ids:
        doc["prompt_token_ids"] = handle.prompt
    return doc


async def _stream(
    state: ServerState,
    kind: str,
    rid: str,
    handle: EngineRequest,
    bridge: _Bridge,
    include_usage: bool,
    token_ids: bool,
    tool_format: str | None = None,
) -> AsyncIterator[dict[str, str]]:
    created, model = int(time.time()), state.model
    tool_parsers = None
    if tool_format is not None:
        from ..tool_calls import ToolCallStreamParser

        tool_parsers = [ToolCallStreamParser(tool_format) for _ in range(handle.n)]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    usage_field = {"usage": None} if include_usage else {}
    open_choices = set(range(handle.n))
    want_logprobs = handle.params.logprobs is not None

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, str]:
        doc = {"id": rid, "object": obj, "created": created, "model": state.name, "choices": choices, **extra}
        return {"data": json.dumps(doc, ensure_ascii=False, separators=(",", ":"))}

    try:
        if kind == "chat":
            for i in range(handle.n):
                opening = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                yield chunk([{**opening, "finish_reason": None}], **usage_field)
        while open_choices:
            event = await bridge.queue.get()
            if event.error is not None:
                open_choices.discard(event.index)
                err = error_body(f"the model failed on this request: {event.error}", "internal_error")
                yield {"data": json.dumps(err)}
                continue
            finish = FINISH.get(event.finish_reason, event.finish_reason) if event.finish_reason else None
            lp = None
            if kind == "chat":
                delta: dict[str, Any] = {}
                for d in event.deltas:
                    key = "reasoning_content" if d.part == "reasoning" else "content"
                    delta[key] = delta.get(key, "") + d.text
                if tool_parsers is not None:  # the content goes through the tool-call parser
                    parser = tool_parsers[event.index]
                    pieces = parser.feed(delta.pop("content", ""))
                    if finish is not None:
                        pieces += parser.finish()
                        if parser.calls and finish == "stop":
                            finish = "tool_calls"
                    for piece in pieces:
                        if piece.content is not None:
                            delta["content"] = delta.get("content", "") + piece.content
                        else:
                            delta.setdefault("tool_calls", []).append(piece.tool_call)
                if want_logprobs and event.logprobs:
                    lp = _chat_logprobs(model, event.logprobs)
                choice = {"index": event.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                send = bool(delta or lp or finish or (token_ids and event.tokens))
            else:  # one chunk per step that made tokens, even without text (no tokenizer, a held-back stop)
                if want_logprobs and event.logprobs:
                    lp = _completion_logprobs(model, event.logprobs)
                choice = {"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": finish}
                send = bool(event.text or event.tokens or finish)
            if token_ids:
                choice["token_ids"] = event.tokens
            if send:
                yield chunk([choice], **usage_field)
            if finish is not None:
                open_choices.discard(event.index)
        if include_usage:
            yield chunk([], usage=_usage(handle))
        yield {"data": "[DONE]"}
    finally:
        if not handle.done:  # the client went away (or the server is stopping): free the batch slot
            handle.cancel()

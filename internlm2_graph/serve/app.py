"""The HTTP routes: OpenAI's chat completions, completions and models, on any backend.

`create_app(backend, model_name)` builds a FastAPI app around an object with EngineBackend's
interface (engine.py), so a Ray Serve deployment can put the same routes in front of one
backend per GPU. Every failure a client can cause is a 4xx with OpenAI's error body; a request
whose client goes away is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from internlm2_graph.serve import tools
from internlm2_graph.serve.engine import FINISH_REASONS, Failed, Finished, Refused, Sampling
from internlm2_graph.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    OpenAIError,
    parse,
)


def create_app(backend, model_name: str) -> FastAPI:
    app = FastAPI(title="internlm2-graph", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        error = OpenAIError(err.status_code, str(err.detail), code=_code(err.status_code))
        return JSONResponse(error.body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(OpenAIError(400, str(err.errors()[0]["msg"])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        error = OpenAIError(500, f"internal error: {err!r}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", **backend.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "local"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        _check_model(name, model_name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "local"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await _json(request))
        _check_model(body.model, model_name)
        plan = chat_plan(backend, body)
        return await _respond(request, backend, plan, body, model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await _json(request))
        _check_model(body.model, model_name)
        text = body.text()
        prompt = backend.encode(text, add_special_tokens=True) if isinstance(text, str) else text
        if max(prompt) >= backend.vocab_size:
            raise OpenAIError(
                400, f"prompt: token ids must be below {backend.vocab_size}", param="prompt"
            )
        plan = Plan(prompt, _sampling(backend, body, body.max_tokens, prompt), body.stop_strings())
        return await _respond(request, backend, plan, body, model_name, chat=False)

    return app


@dataclass(frozen=True)
class Plan:
    """What to run for a request: prompt ids, the turn's settings, how to read the reply."""

    prompt: list[int]
    sampling: Sampling
    stops: list[str]
    parse_tools: bool = False
    in_call: bool = False  # the prompt opened a tool call (a forced tool_choice)


def chat_plan(backend, body: ChatCompletionRequest) -> Plan:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    offered = body.tools if body.tool_choice != "none" else None
    if offered and backend.special_ids is None:
        raise OpenAIError(
            400,
            "tools: this model's tokenizer has no <|action_start|>, <|action_end|> and "
            "<|plugin|> tokens (a base model?): serve a chat model for tool calls",
            param="tools",
        )
    offered_tools = [tool.model_dump(exclude_none=True) for tool in offered or ()]
    functions = [tool["function"] for tool in offered_tools]
    rendered = backend.render(tools.template_messages(messages, offered_tools))
    guidance = _format_guidance(body)
    forced = body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)
    if forced:
        if isinstance(body.tool_choice, NamedToolChoice):
            functions = [f for f in functions if f["name"] == body.tool_choice.function.name]
        rendered += tools.FORCED_CALL_PREFIX
        guidance = ("json_schema", _compact(tools.call_schema(functions)))
    prompt = backend.encode(rendered)
    sampling = _sampling(backend, body, body.reply_limit(), prompt, guidance)
    return Plan(prompt, sampling, body.stop_strings(), parse_tools=bool(offered), in_call=forced)


def _format_guidance(body: ChatCompletionRequest) -> tuple[str, str] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ("json_schema", _compact({"type": "object"}))
    return ("json_schema", _compact(fmt.json_schema.schema_ or {}))


def _compact(schema: dict) -> str:
    """The schema with JSON's optional whitespace turned off: a weak model given the choice
    can write newlines until max_tokens (seen with random weights); the JSON is the same."""
    if "x-guidance" not in schema:
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return json.dumps(schema)


def _sampling(backend, body, limit: int | None, prompt: list[int], guidance=None) -> Sampling:
    """OpenAI's sampling fields as a turn's settings: temperature 0 is greedy; a temperature
    or top_p turns sampling on (as `chat` does); what is left out is the folder's default."""
    room = backend.max_length - len(prompt)
    do_sample = None
    if body.temperature == 0:
        do_sample = False
    elif body.temperature is not None or body.top_p is not None or body.top_k:
        do_sample = True
    return Sampling(
        max_tokens=limit if limit is not None else max(room, 1),
        min_tokens=body.min_tokens,
        do_sample=do_sample,
        temperature=body.temperature or None,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        guidance=guidance,
    )


# ----- running a turn and writing the reply -----


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class StopMatcher:
    """Stop strings over streamed text: holds back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self._held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        text = self._held + text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return text[:cut]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that starts `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


async def run_turn(backend, plan: Plan, outcome: list) -> AsyncIterator[tools.Delta]:
    """The reply's deltas as they come; `outcome` receives an Outcome at the end."""
    try:
        turn = backend.submit(plan.prompt, plan.sampling)
    except Refused as err:
        raise OpenAIError(400, str(err), param=err.param, code=err.code) from None
    parser = tools.ToolCallParser(backend.special_ids if plan.parse_tools else None, plan.in_call)
    matcher = StopMatcher(plan.stops)
    decoder = backend.decoder()
    generated = 0
    try:
        async for event in turn:
            if isinstance(event, Failed):
                kind = "invalid_request_error" if event.status < 500 else "server_error"
                raise OpenAIError(event.status, event.message, kind=kind)
            if isinstance(event, Finished):
                for delta in parser.finish():
                    if not matcher.stopped:
                        yield delta
                if not matcher.stopped and (rest := matcher.flush()):
                    yield tools.Content(rest)
                reason = "stop" if matcher.stopped else FINISH_REASONS.get(event.reason, "stop")
                if parser.calls and reason == "stop":
                    reason = "tool_calls"
                generated = event.generated or generated
                outcome.append(
                    Outcome(reason, len(plan.prompt), generated, event.cached_prompt_tokens)
                )
                return
            generated += 1
            if matcher.stopped or event.id in backend.stop_ids:
                continue
            for delta in parser.feed(event.id, decoder.decode(event.id)):
                if isinstance(delta, tools.Content):
                    text = matcher.feed(delta.text)
                    if text:
                        yield tools.Content(text)
                    if matcher.stopped:
                        turn.cancel()
                        break
                else:
                    yield delta
    finally:
        turn.cancel()  # a no-op once finished; otherwise the client went away mid-reply


async def _respond(request: Request, backend, plan: Plan, body, model_name: str, chat: bool):
    ids = _Ids(chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(backend, plan, ids, model_name, chat, include_usage)
        # Headers go out with the first event: by then the turn was begun, or refused (a 4xx).
        watcher = asyncio.ensure_future(_disconnect(request))
        try:
            first = [item async for item in _racing(events, watcher, limit=1)]
        finally:
            watcher.cancel()
        if not first:  # the client left while its request waited
            return Response(status_code=499)
        return StreamingResponse(
            _watched(request, _prepend(first[0], events)), media_type="text/event-stream"
        )
    outcome: list[Outcome] = []
    deltas = []
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        async for delta in _racing(run_turn(backend, plan, outcome), watcher):
            deltas.append(delta)
    finally:
        watcher.cancel()
    if not outcome:  # the client left: nobody reads this
        return Response(status_code=499)
    content, calls = tools.collect(deltas)
    result = outcome[0]
    usage = _usage(result)
    if chat:
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = [
                {"id": ids.call(i), "type": "function", "function": call}
                for i, call in enumerate(calls)
            ]
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
        return ids.envelope(model_name, choices=[choice], usage=usage)
    choice = {"index": 0, "text": content, "finish_reason": result.finish_reason, "logprobs": None}
    return ids.envelope(model_name, choices=[choice], usage=usage)


async def _stream(backend, plan, ids, model_name, chat: bool, include_usage: bool):
    """Server-sent events of one reply, OpenAI's chunk shapes."""
    outcome: list[Outcome] = []
    deltas = run_turn(backend, plan, outcome)
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    if chat:
        yield _sse(ids.chunk(model_name, {"role": "assistant", "content": ""}))
    pending = [first] if first is not None else []
    try:
        async for delta in _chain(pending, deltas):
            yield _sse(ids.chunk(model_name, _delta(delta, ids, chat)))
    except OpenAIError as err:  # the engine failed mid-reply: say so in the stream
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
        return
    result = outcome[0]
    yield _sse(ids.chunk(model_name, {} if chat else "", result.finish_reason))
    if include_usage:
        yield _sse(ids.envelope(model_name, choices=[], usage=_usage(result), chunk=True))
    yield "data: [DONE]\n\n"


async def _chain(pending: list, rest: AsyncIterator):
    for item in pending:
        yield item
    async for item in rest:
        yield item


def _delta(delta: tools.Delta, ids: _Ids, chat: bool):
    if not chat:
        return delta.text
    if isinstance(delta, tools.Content):
        return {"content": delta.text}
    if isinstance(delta, tools.CallStart):
        call = {
            "index": delta.index,
            "id": ids.call(delta.index),
            "type": "function",
            "function": {"name": delta.name, "arguments": ""},
        }
    else:
        call = {"index": delta.index, "function": {"arguments": delta.text}}
    return {"tool_calls": [call]}


class _Ids:
    def __init__(self, chat: bool):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._calls: dict[int, str] = {}

    def call(self, index: int) -> str:
        return self._calls.setdefault(index, "call_" + uuid.uuid4().hex[:24])

    def envelope(self, model_name: str, *, choices: list, usage=None, chunk: bool = False):
        kind = "chat.completion" if self.chat else "text_completion"
        out = {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": model_name,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def chunk(self, model_name: str, delta, finish_reason: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        return self.envelope(model_name, choices=[choice], chunk=True)


def _usage(result: Outcome) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]):
    yield first
    async for item in rest:
        yield item


async def _watched(request: Request, events: AsyncIterator[str]):
    """`events`, stopped (and the turn with it, through run_turn's finally) when the client
    disconnects, even while no token is due to be sent."""
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        async for item in _racing(events, watcher):
            yield item
    finally:
        watcher.cancel()
        await events.aclose()


async def _racing(items: AsyncIterator, watcher: asyncio.Future, limit: int | None = None):
    """Items of `items` until it ends or `watcher` finishes first (the client left: `items`
    is closed); at most `limit` of them (then `items` stays open)."""
    while limit is None or limit > 0:
        limit = None if limit is None else limit - 1
        step = asyncio.ensure_future(items.__anext__())
        try:
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # whoever reads this was cancelled
            await _abandon(step, items)
            raise
        if not step.done():  # the client left
            await _abandon(step, items)
            return
        try:
            item = step.result()
        except StopAsyncIteration:
            return
        yield item


async def _abandon(step: asyncio.Future, items: AsyncIterator) -> None:
    step.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await step
    await items.aclose()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"the request body is not valid JSON: {err}") from None


def _check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise OpenAIError(
            404,
            f"the model {name!r} does not exist here: this server has {model_name!r}",
            param="model",
            code="model_not_found",
        )


def _code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)

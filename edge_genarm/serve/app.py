"""The HTTP side of `edge-genarm serve`: FastAPI routes in OpenAI's shapes over the `Worker`.

Contract:
- `create_app(config, load, on_fatal)` returns the ASGI app. At start-up `load()` runs on a
  thread of its own (it loads the models); until it returns, `/health` and the model routes
  answer 503, after it `/health` answers 200. If it raises, `on_fatal(exc)` is told.
- `POST /v1/chat/completions`, `POST /v1/completions`: streamed as server-sent events
  (`data: [DONE]` last) or not; each request's own ARM weights and sampling; `n` answers from one
  prefill. A client that goes away mid-request has its sequences freed at once.
- Structured answers (response_format, json_schema, grammar, regex, choice) on both routes;
  tool calls on chat (`tools.py` plans the grammar and reads the answer): the message's
  `tool_calls` with finish reason "tool_calls", or streamed as OpenAI's tool-call deltas. An
  answer whose grammar failed mid-way is an error the client sees: 500 with its message, or,
  streaming, a last `{"error": ...}` event; other requests go on.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
- Every error is OpenAI's body with a 4xx/5xx status (`protocol.ApiError`); with an API key,
  every route but `/health` wants `Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, \
    Histogram, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .. import __version__, options, tools
from ..errors import ContextFullError, EngineError, UnknownArmError, UserError
from ..generation import Answer, encode_messages, with_system
from ..scheduler import Handle
from ..templates import renders_tools, tool_history
from . import protocol
from .protocol import ApiError, finish_reason
from ..worker import QueueFull, Served, Worker

FINGERPRINT = f"edge-genarm-{__version__}"
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # --parallel is at most 256


@dataclass
class ServeConfig:
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body: int = 1 << 20   # bytes


class Metrics:
    """Prometheus counters in a registry of the app's own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r, by_model = self.registry, ["model"]
        self.requests = Counter("edge_genarm_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.prompt = Counter("edge_genarm_prompt_tokens", "Prompt tokens", by_model, registry=r)
        self.cached = Counter("edge_genarm_cached_prompt_tokens",
                              "Prompt tokens copied from a cache, not decoded", by_model,
                              registry=r)
        self.completion = Counter("edge_genarm_completion_tokens", "Generated tokens", by_model,
                                  registry=r)
        self.drafted = Counter("edge_genarm_draft_tokens", "Speculative draft tokens verified",
                               by_model, registry=r)
        self.accepted = Counter("edge_genarm_accepted_draft_tokens",
                                "Speculative draft tokens kept", by_model, registry=r)
        self.ttft = Histogram("edge_genarm_time_to_first_token_seconds",
                              "Seconds from submission to an answer's first token", by_model,
                              registry=r)
        self.queue = Gauge("edge_genarm_queue_depth", "Requests waiting for a sequence",
                           by_model, registry=r)
        self.active = Gauge("edge_genarm_requests_active", "Requests running or waiting",
                            by_model, registry=r)
        self.cells = Gauge("edge_genarm_kv_cells_used", "KV cells held by sequences", by_model,
                           registry=r)
        self.cells_total = Gauge("edge_genarm_kv_cells", "KV cells in the cache", by_model,
                                 registry=r)
        # requests that shared one step's batch: above 1, concurrent requests really overlapped
        self.step_requests = Histogram("edge_genarm_step_requests",
                                       "Requests given a token by one decode step", by_model,
                                       buckets=STEP_BUCKETS, registry=r)

    def answered(self, model: str, answers: list[Answer]) -> None:
        for a in answers:
            if a.usage is not None:
                self.completion.labels(model).inc(a.usage.completion_tokens)
                self.drafted.labels(model).inc(a.usage.drafted_tokens)
                self.accepted.labels(model).inc(a.usage.accepted_tokens)
                if a.usage.completion_tokens:
                    self.ttft.labels(model).observe(a.usage.time_to_first_token)

    def stepped(self, model: Served, events: list) -> None:
        """From the stepping thread: a step that gave no token (closing events only) is not
        counted; a best-of-n request counts once its best answer goes out."""
        requests = len({e.handle for e in events if e.token is not None})
        if requests:
            self.step_requests.labels(model.name).observe(requests)

    def render(self, models: dict[str, Served]) -> bytes:
        for name, m in models.items():
            self.queue.labels(name).set(m.scheduler.waiting)
            self.active.labels(name).set(m.active)
            self.cells.labels(name).set(m.cells_in_use)
            self.cells_total.labels(name).set(m.engine.base.n_cells)
        return generate_latest(self.registry)


class State:
    def __init__(self):
        self.models: dict[str, Served] | None = None
        self.worker: Worker | None = None

    def model(self, name: str | None) -> Served:
        if self.models is None:
            raise ApiError(503, "the models are still loading; retry shortly",
                           code="model_loading", headers={"Retry-After": "2"})
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ApiError(404, f"no model {name!r}; this server has "
                           f"{', '.join(self.models)} (see /v1/models)", "model",
                           "model_not_found")
        return self.models[name]


def create_app(config: ServeConfig, load: Callable[[], dict[str, Served]],
               on_fatal: Callable[[BaseException], None]) -> FastAPI:
    state, metrics = State(), Metrics()

    loaded = threading.Event()  # set once load() has returned or failed

    def loader() -> None:
        try:
            models = load()
        except BaseException as exc:  # told to the command, which stops the server
            loaded.set()
            on_fatal(exc)
            return
        worker = Worker(models, on_step=metrics.stepped)
        worker.start()
        state.worker, state.models = worker, models
        loaded.set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=loader, name="edge-genarm-load", daemon=True)
        thread.start()
        yield
        thread.join()
        if state.worker is not None:
            state.worker.stop()

    app = FastAPI(title="edge-genarm", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loaded, app.state.serving = loaded, state
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.requests.labels(_endpoint(request), str(exc.status)).inc()
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return await api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return await api_error(request, ApiError(500, f"internal error: {exc!r}"))

    @app.get("/health")
    async def health():
        if state.models is None:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "2"})
        return {"status": "ok"}

    router = APIRouter(dependencies=[Depends(_authorize(config.api_key))])

    @router.get("/metrics")
    async def prometheus():
        return Response(metrics.render(state.models or {}), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def list_models():
        state.model(None)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": m.created, "owned_by": "edge-genarm",
             "arms": {a.name: a.alpha for a in m.engine.arms}}
            for name, m in state.models.items()]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, "chat")

    @router.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, "completion")

    async def _complete(request: Request, kind: str):
        body = protocol.parse(kind, await read_body(request, config.max_body))
        model = state.model(body.model)
        call = _Call(kind, body, model, state.worker, metrics)
        call.submit(_prompts(kind, body, model, call.plan))
        metrics.requests.labels(_endpoint(request), "200").inc()
        if body.stream:
            return EventSourceResponse(call.chunks(), ping=15, sep="\n")
        response = await call.collect(request)
        return Response(status_code=499) if response is None else JSONResponse(response)

    app.include_router(router)
    return app


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/health")


def _endpoint(request: Request) -> str:
    """The metrics label of a path: any other path is "other", so that a scan of made-up paths
    cannot grow the metrics without bound."""
    return request.url.path if request.url.path in ENDPOINTS else "other"


def _authorize(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                given.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


async def read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the body is over {limit} bytes; send a smaller request",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _tool_plan(body, model: Served) -> tools.ToolPlan | None:
    """The request's tools as a grammar (None: it may not call), its other constraints
    refused beside them."""
    try:
        plan = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls,
                          model.template)
    except UserError as exc:
        raise ApiError(400, str(exc), exc.param, "invalid_value") from None
    if plan is not None:
        taken = [n for n in (*protocol.CONSTRAINTS, "grammar_trigger") if getattr(body, n)]
        if protocol.response_schema(body.response_format) is not None:
            taken.insert(0, "response_format")
        if taken:
            raise ApiError(400, f"{taken[0]} constrains the answer, and so do its tools (a "
                           f"grammar for the calls): drop {taken[0]}, or set tool_choice "
                           '"none"', taken[0], "invalid_value")
    return plan


def _prompts(kind: str, body, model: Served, plan: tools.ToolPlan | None = None
             ) -> list[list[int]]:
    """The token ids of each prompt: messages through the chat template (the tools' own
    instructions and history in it), or completion prompts (text, or token ids as they are)."""
    engine = model.engine
    try:
        if kind == "chat":
            if model.template is None:
                raise ApiError(400, f"{model.name} has no chat template; use /v1/completions",
                               "messages")
            messages = with_system([m.as_dict() for m in body.messages],
                                   model.config.request.system)
            messages = tool_history(messages, renders_tools(model.template))
            if plan is not None:
                messages = plan.instruct(messages)
            return [encode_messages(engine, messages, model.template,
                                    plan.template_tools if plan else None)]
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(engine.model.tokenize(p, add_special=True))
            elif any(not 0 <= t < engine.n_vocab for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {engine.n_vocab})",
                               "prompt")
            else:
                out.append(list(p))
        return out
    except UserError as exc:  # a template that refuses the messages, text that is not UTF-8
        raise ApiError(400, str(exc), "messages" if kind == "chat" else "prompt") from None


class _Call:
    """One HTTP request's scheduler requests, from submission to the response or stream."""

    def __init__(self, kind: str, body, model: Served, worker: Worker, metrics: Metrics):
        self.kind, self.body, self.model, self.worker = kind, body, model, worker
        self.metrics = metrics
        self.plan = _tool_plan(body, model) if kind == "chat" else None
        self.parsers: dict[int, tools.ToolCallParser] = {}  # streaming: one per answer
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.handles: list[Handle] = []
        self.answers: list[Answer] = []

    def submit(self, prompts: list[list[int]]) -> None:
        given = protocol.call_options(
            self.body, tokenize=lambda text: self.model.engine.model.tokenize(text, False))
        if self.plan is not None:
            given["grammar"] = self.plan.grammar
        param = "messages" if self.kind == "chat" else "prompt"
        try:
            requests = [options.call(self.model.config.request, ids, given) for ids in prompts]
            if requests[0].n > self.model.parallel:
                raise ApiError(400, f"n must be at most {self.model.parallel} (the server's "
                               f"--parallel), got {requests[0].n}", "n")
            loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
            self.handles = self.worker.submit(
                self.model, requests,
                lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item))
        except QueueFull as exc:
            raise ApiError(503, str(exc), code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ContextFullError as exc:
            raise ApiError(400, str(exc), param, "context_length_exceeded") from None
        except UnknownArmError as exc:
            raise ApiError(400, str(exc), "arms", "unknown_arm") from None
        except UserError as exc:  # a request option out of range names itself
            if exc.param is None:
                raise ApiError(400, str(exc), param) from None
            name = "top_logprobs" if exc.param == "logprobs" and self.kind == "chat" else exc.param
            if exc.param == "json_schema" and protocol.response_schema(
                    getattr(self.body, "response_format", None)) is not None:
                name = "response_format"
            raise ApiError(400, str(exc), name, "invalid_value") from None
        self.n = requests[0].n
        self.answers = [Answer(i) for i in range(len(prompts) * self.n)]
        for ids in prompts:
            self.metrics.prompt.labels(self.model.name).inc(len(ids))

    def _choice(self, event) -> Answer:
        return self.answers[self.handles.index(event.handle) * self.n + event.index]

    async def _events(self) -> AsyncIterator:
        """Every event of this call, in order, until all its answers have ended."""
        while any(a.usage is None for a in self.answers):
            event = self._check(await self.queue.get())
            self._choice(event).add(event)
            yield event

    @staticmethod
    def _check(item):
        if isinstance(item, EngineError):
            raise ApiError(500, f"llama.cpp failed: {item}", code="engine_error")
        return item

    @staticmethod
    def _broken(answer: Answer) -> None:
        """An answer whose grammar failed mid-way is the request's error, not an answer."""
        if answer.usage is not None and answer.usage.finish_reason == "grammar_error":
            # llguidance's report runs over several lines: its first says what broke
            why = (answer.usage.error or "").strip().splitlines()
            raise ApiError(500, why[0] if why else "the answer broke its grammar",
                           code="grammar_error")

    def _message(self, answer: Answer) -> tuple[dict, str | None]:
        """A finished chat answer's message and finish reason (its tool calls read out)."""
        reason = finish_reason(answer)
        if self.plan is None:
            return {"role": "assistant", "content": answer.text}, reason
        content, calls = tools.parse(answer.text, self.plan.format)
        if not calls:
            return {"role": "assistant", "content": content}, reason
        return ({"role": "assistant", "content": content, "tool_calls": calls},
                "tool_calls" if reason == "stop" else reason)

    def _extras(self) -> dict:
        return {"system_fingerprint": FINGERPRINT, "seed": self.handles[0].request.seed,
                "arms": {a.name: float(w) for a, w in zip(self.model.engine.arms,
                                                          self.handles[0].policy.alphas)}}

    def _finished(self) -> dict:
        usage = protocol.usage_body(self.answers, self.n)
        self.metrics.cached.labels(self.model.name).inc(
            usage["prompt_tokens_details"]["cached_tokens"])
        self.metrics.answered(self.model.name, self.answers)
        return usage

    async def collect(self, request: Request) -> dict | None:
        """The whole response, or None if the client left first (its work is cancelled)."""
        getter = None
        try:
            while any(a.usage is None for a in self.answers):
                getter = getter or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if not done:
                    if await request.is_disconnected():
                        getter.cancel()
                        return None
                    continue
                event, getter = self._check(getter.result()), None
                self._choice(event).add(event)
        finally:
            self.worker.cancel([h for h in self.handles if not h.done])
        usage = self._finished()
        for a in self.answers:
            self._broken(a)
        token_bytes = self.model.engine.model.token_bytes
        choices = []
        for a in self.answers:
            if self.kind == "chat":
                lp = protocol.chat_logprobs(token_bytes, a.logprobs) \
                    if self.body.logprobs else None
                message, reason = self._message(a)
                choices.append({"index": a.index, "message": message, "logprobs": lp,
                                "finish_reason": reason})
            else:
                lp = protocol.completion_logprobs(token_bytes, a.logprobs) \
                    if self.body.logprobs is not None else None
                choices.append({"index": a.index, "text": a.text, "logprobs": lp,
                                "finish_reason": finish_reason(a)})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model.name,
                "choices": choices, "usage": usage, **self._extras()}

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text (or log-prob), a last chunk per
        answer with its finish reason, the usage chunk if asked, then [DONE]."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        head = {"id": self.id, "object": obj, "created": self.created,
                "model": self.model.name, **self._extras()}
        if include_usage:
            head["usage"] = None
        token_bytes = self.model.engine.model.token_bytes
        offsets = [0] * len(self.answers)
        try:
            if self.kind == "chat":
                for a in self.answers:
                    yield _dump(head, self._chat_choice(a.index, {"role": "assistant",
                                                                  "content": ""}))
            async for event in self._events():
                answer = self._choice(event)
                lp = [event.logprob] if event.logprob is not None else []
                if event.finish_reason:
                    self._broken(answer)
                if self.kind == "chat":
                    for choice in self._chat_chunks(event, answer, lp):
                        yield _dump(head, choice)
                elif event.text or lp or event.finish_reason:
                    logprobs = protocol.completion_logprobs(
                        token_bytes, lp, offsets[answer.index]) if lp else None
                    offsets[answer.index] += len(event.text)
                    yield _dump(head, {"index": answer.index, "text": event.text,
                                       "logprobs": logprobs,
                                       "finish_reason": finish_reason(answer)})
            usage = self._finished()
            if include_usage:
                yield json.dumps(head | {"choices": [], "usage": usage})
            yield "[DONE]"
        except ApiError as exc:  # after the stream began, an error is its last event
            yield json.dumps(exc.body())
        finally:
            self.worker.cancel([h for h in self.handles if not h.done])

    def _chat_chunks(self, event, answer: Answer, lp: list) -> list[dict]:
        """One event's chat choices: its text as a content delta (or, with tools, the deltas
        the parser reads from it), its log-prob on the first, and the finish reason."""
        logprobs = protocol.chat_logprobs(self.model.engine.model.token_bytes, lp) \
            if lp else None
        parser = None
        if self.plan is None:
            deltas = [{"content": event.text}] if event.text or lp else []
        else:
            parser = self.parsers.setdefault(answer.index,
                                             tools.ToolCallParser(self.plan.format))
            deltas = parser.feed(event.text) + (parser.finish() if event.finish_reason else [])
            deltas = deltas or ([{}] if lp else [])
        out = [self._chat_choice(answer.index, d, logprobs=logprobs if not i else None)
               for i, d in enumerate(deltas)]
        if event.finish_reason:
            reason = finish_reason(answer)
            if parser is not None and parser.called and reason == "stop":
                reason = "tool_calls"
            out.append(self._chat_choice(answer.index, {}, reason))
        return out

    @staticmethod
    def _chat_choice(index: int, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _dump(head: dict, choice: dict) -> str:
    return json.dumps(head | {"choices": [choice]})

"""`edge-genarm serve --ray [ADDRESS] --replicas N`: the OpenAI server on Ray Serve.

Contract:
- Two deployments behind Ray Serve's one HTTP proxy (on the head node): `Gateway`, one replica,
  reads each request's body and forwards the request whole through a deployment handle to one
  of N `EngineReplica`s; each runs the single-process server's own app (`serve.app`) on its
  models in-process, so that routes, API key, error bodies, streaming and /health answer
  exactly as `edge-genarm serve` does. Every response carries the header
  `x-edge-genarm-replica` naming the replica that answered.
- Routing is Ray Serve's request-router hook (`PrefixRouter`): a completion goes to the replica
  that last served the longest prefix of its text (64-character blocks of the messages or
  prompt), unless that replica has `IMBALANCE` more requests in flight than the least loaded
  one; otherwise, and for everything else, the least loaded.
- Capacity: each replica takes --parallel running plus --max-queue waiting
  (`max_ongoing_requests`); with every replica full, up to --max-queue more per replica wait
  at the gateway (Ray's `max_queued_requests`, which also holds requests while they are
  routed), and beyond that a request is answered 503 with Retry-After, as one server's full
  queue is.
- `/metrics` gathers every replica's and adds the label `replica` to each sample, plus a
  `replica="total"` sum.
- A replica that dies mid-request: its requests get a 503 (`replica_lost`, Retry-After) or,
  once streaming, an error event; Ray Serve starts a new replica and the others go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.request_router import RequestRouter

from ..errors import UserError
from ..serve.app import ServeConfig, create_app, read_body
from ..worker import load_served
from ..serve.protocol import ApiError

BLOCK = 64         # characters per prefix block
MAX_BLOCKS = 64    # longer prefixes add little: the first 4096 characters decide
IMBALANCE = 4      # requests in flight beyond the least loaded replica that affinity may cost
REPLICA_HEADER = "x-edge-genarm-replica"
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


def prefix_hashes(body: bytes) -> list[str]:
    """Hashes of the growing prefixes of a completion's text, one per block: two requests
    share the first k hashes when their texts agree on the first k blocks."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict):
        return []
    text = data.get("messages", data.get("prompt"))
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)[:-1]
    digest = hashlib.blake2b(str(data.get("model")).encode(), digest_size=8)
    out = []
    for start in range(0, min(len(text), BLOCK * MAX_BLOCKS), BLOCK):
        digest.update(text[start:start + BLOCK].encode("utf-8", "surrogatepass"))
        out.append(digest.copy().hexdigest())
    return out


class PrefixRouter(RequestRouter):
    """Ray Serve's routing hook: prefix affinity, else the least loaded; `replica=k` picks the
    k-th replica in id order (the gateway's /metrics asks each)."""

    def initialize_state(self, max_entries: int = 100_000, **kwargs):
        self._owner: OrderedDict = OrderedDict()  # prefix hash -> replica id, least recent first
        self._max_entries = max_entries

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if kwargs.get("replica") is not None:
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            return [[ordered[kwargs["replica"] % len(ordered)]]] if ordered else []
        load = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0
                for r in candidate_replicas}
        ranked = sorted(candidate_replicas, key=lambda r: (load[r.replica_id], random.random()))
        by_id = {r.replica_id: r for r in candidate_replicas}
        for h in reversed(kwargs.get("prefix") or []):
            owner = self._owner.get(h)
            if owner in by_id:
                if load[owner] - load[ranked[0].replica_id] <= IMBALANCE:
                    return [[by_id[owner]], [r for r in ranked if r.replica_id != owner]]
                break
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        for h in pending_request.kwargs.get("prefix") or []:
            self._owner[h] = replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self._max_entries:
            self._owner.popitem(last=False)


class EngineReplica:
    """One replica: the models of every preset, and the single-process app run in-process."""

    async def __init__(self, configs: dict, max_queue: int, config: ServeConfig):
        # model references resolve here, on this replica's node: its own paths and cache
        models = await asyncio.to_thread(load_served, configs, max_queue, True)
        self.failure: list[BaseException] = []
        self.app = create_app(config, lambda: models, self.failure.append)
        self.id = serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the stepping thread
        await asyncio.to_thread(self.app.state.loaded.wait)

    async def check_health(self) -> None:
        if self.failure:
            raise RuntimeError(f"the models failed: {self.failure[0]}")

    async def http(self, method: str, path: str, query: str, headers: list, body: bytes,
                   prefix: list[str] | None = None, replica: int | None = None):
        """The app's answer to one HTTP request: a dict {status, headers} first, then the body
        in pieces as the app sends them (a stream's events one by one)."""
        async for message in _call_asgi(self.app, method, path, query, headers, body):
            if isinstance(message, dict):
                message["headers"].append((REPLICA_HEADER, self.id))
            yield message


async def _call_asgi(app, method: str, path: str, query: str, headers: list, body: bytes):
    """Drive an ASGI app with one request: its start message, then its body pieces. Closing
    the generator tells the app the client went away."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    given = False

    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "",
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.ensure_future(app(scope, receive, sent.put))
    try:
        while True:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                task.result()  # the app ended without answering: its error, if any
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1"))
                                   for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                # what the app has sent meanwhile travels as one piece: one Ray message
                # for several tokens of a busy replica
                body = [message.get("body", b"")]
                while message.get("more_body") and not sent.empty():
                    message = sent.get_nowait()
                    body.append(message.get("body", b""))
                if any(body):
                    yield b"".join(body)
                if not message.get("more_body"):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()


class Gateway:
    """The one ingress replica: forwards each request to an `EngineReplica` (see the module
    docstring); its app is built on the replica (`__serve_build_asgi_app__`)."""

    def __init__(self, engine, config: ServeConfig, replicas: int):
        self.engine, self.config, self.replicas = engine, config, replicas

    def __serve_build_asgi_app__(self):
        return gateway_app(self.engine, self.config, self.replicas)


def gateway_app(engine, config: ServeConfig, replicas: int) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.get("/metrics")
    async def metrics(request: Request):
        # one after another: calls made while serving one request share its request id, and
        # Ray's router matches a routing decision to its request by that id
        texts = {}
        for k in range(replicas):
            try:
                status, headers, chunks = await _forward(engine, request, b"", replica=k)
                body = b"".join([c async for c in chunks])
            except ApiError:
                continue  # a replica restarting: the others are reported
            if status != 200:
                return Response(body, status, headers=dict(headers))
            texts.setdefault(dict(headers).get(REPLICA_HEADER, "?"), body.decode())
        if not texts:
            raise _lost()
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH",
                                            "OPTIONS", "HEAD"])
    async def forward(request: Request, path: str):
        body = await read_body(request, config.max_body)
        prefix = prefix_hashes(body) if request.url.path in COMPLETIONS else None
        status, headers, chunks = await _forward(engine, request, body, prefix=prefix)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        return StreamingResponse(_guarded(chunks), status, headers=dict(headers))

    return app


async def _forward(engine, request: Request, body: bytes, **routing):
    """Send one request to a replica: (status, headers, the body's pieces). A replica lost
    before answering, or every replica full, is an `ApiError` 503."""
    from ray.serve.exceptions import BackPressureError
    call = engine.options(stream=True).http.remote(
        request.method, request.url.path, request.url.query,
        [(k, v) for k, v in request.headers.items()], body, **routing)
    try:
        start = await call.__anext__()
    except BackPressureError:
        raise ApiError(503, "every replica is busy: --parallel running and --max-queue "
                       "waiting on each; retry shortly", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except Exception:  # the replica died or was restarting
        raise _lost() from None
    return start["status"], start["headers"], call


def _lost() -> ApiError:
    return ApiError(503, "the replica serving this request stopped; retry it (another "
                    "replica takes it)", code="replica_lost", headers={"Retry-After": "1"})


async def _guarded(chunks):
    """The body's pieces; a replica lost mid-stream ends the stream with an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception:
        yield ("data: " + json.dumps(_lost().body()) + "\n\n").encode()


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Every replica's samples with a `replica` label, and their sum as replica="total"."""
    families: dict[str, Metric] = {}
    totals: dict[tuple, float] = {}
    for name, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name,
                                                             family.documentation,
                                                             family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, sample.labels | {"replica": name}, sample.value)
                if not sample.name.endswith("_created"):
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    totals[key] = totals.get(key, 0.0) + sample.value
    for (family, sample, labels), value in totals.items():
        families[family].add_sample(sample, dict(labels) | {"replica": "total"}, value)

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# -- the command -------------------------------------------------------------------------------
def run(address: str | None, configs: dict, replicas: int, max_queue: int,
        config: ServeConfig, host: str, port: int) -> None:
    """Deploy on the cluster, wait for every replica to load, serve until Ctrl-C (or SIGTERM),
    then take the application down."""
    import signal
    import click
    from . import connect, first_line
    load = next(iter(configs.values())).load
    parallel, threads = load.parallel, load.threads or 1
    connect(address, load.verbose)
    serve.start(http_options={"host": host, "port": port, "location": "HeadOnly"})
    engine = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=replicas,
        ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=parallel + max_queue,
        max_queued_requests=replicas * max(max_queue, 1),
        request_router_config={"request_router_class": PrefixRouter},
        health_check_period_s=5, graceful_shutdown_timeout_s=5,
    ).bind(configs, max_queue, config)
    gateway = serve.deployment(serve.ingress()(Gateway), name="Gateway",
                               ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000).bind(engine, config, replicas)
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's stop takes it down too
    try:
        try:
            serve.run(gateway, name=APP, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise UserError(f"the replicas could not start: {first_line(exc, last=True)}") from None
        _wait_running(replicas)
        click.echo(f"edge-genarm: serving {', '.join(configs)} on http://{host}:{port}/v1 "
                   f"({replicas} replicas on Ray Serve)", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl-C or a supervisor's stop would cut the teardown short (exit 130, the
        # replicas still up): it runs to its end, and the command exits once they are down
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        serve.shutdown()


APP = "edge-genarm"


def _wait_running(replicas: int) -> None:
    """serve.run returns once one replica answers: wait for all of them."""
    while True:
        app = serve.status().applications.get(APP)
        engine = app.deployments.get("EngineReplica") if app else None
        if engine is not None and engine.replica_states.get("RUNNING", 0) >= replicas:
            return
        if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
            raise UserError(f"the replicas could not start: {app.message}")
        time.sleep(0.5)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt

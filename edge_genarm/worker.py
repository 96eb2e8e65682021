"""The stepping thread: every loaded model's scheduler stepped on one thread, events handed to
whoever asked for them (the server's HTTP requests, the Python API's callers).

Contract:
- `Served` is one model id (a preset): its `Config`, engine, scheduler and chat template;
  `load_served(configs, ...)` builds them (the one place that assembles engine, scheduler and
  template for the Python API, the commands and the server), each after a first decode in a
  child process where `probe` asks for it (`probe.py`), freeing what it loaded on a failure.
- `Worker.submit(model, requests, deliver)` submits a call's scheduler requests (one per prompt)
  and returns their handles; `deliver` is then called on the stepping thread with each of their
  `Event`s, in order, and, if llama.cpp fails, with the `EngineError` (the requests are then
  cancelled): it must only hand the item over (a queue's put), never block. A call beyond the
  model's `parallel` running and `max_queue` waiting raises `QueueFull`; a bad request
  raises `UserError` and nothing is submitted. Both are safe from any thread.
- `cancel(handles)` ends requests at once (a client that went away); their sequences are free
  at the next step. `interrupt(handles)` ends them after the current token, their last event
  ("interrupted") still delivered and their caches kept (chat's Ctrl-C). `stop()` ends the
  thread and closes every scheduler and engine.
- `on_step(model, events)`, if given, is told each step's events on the stepping thread.
- llama.cpp releases the GIL in its calls, so the event loop keeps serving while a step runs;
  models are stepped one after another, as contexts are, since their threads share the cores.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from . import llama, options
from .config import Config
from .engine import Engine
from .errors import EngineError, UserError
from .generation import chat_template
from .scheduler import Event, Handle, Request, Scheduler


class QueueFull(Exception):
    """More requests than --parallel running and --max-queue waiting."""


@dataclass
class Served:
    name: str
    config: Config
    engine: Engine
    scheduler: Scheduler
    template: str | None
    max_queue: int
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0           # requests submitted and not done
    cells_in_use: int = 0     # KV cells held, as of the last step

    @property
    def parallel(self) -> int:
        return self.config.load.parallel


def load_served(configs: dict[str, Config], max_queue: int, probe: bool = False,
                share_prefixes: bool = True) -> dict[str, Served]:
    """Each config's models loaded (after a first decode in a child process with `probe`: a
    crash inside llama.cpp is then one line, not a dead server), by model id."""
    from .probe import check_first_decode
    models: dict[str, Served] = {}
    try:
        for name, config in configs.items():
            engine_config = options.engine_config(config)
            if probe:
                check_first_decode(engine_config)
            engine = Engine.load(engine_config)
            try:
                models[name] = Served(name, config, engine, Scheduler(engine, share_prefixes),
                                      chat_template(engine, config.load.chat_template),
                                      max_queue)
            except BaseException:
                engine.close()
                raise
    except BaseException:
        for m in models.values():
            m.engine.close()
        raise
    return models


@dataclass
class _Route:
    deliver: Callable[[Event | EngineError], None]
    model: Served


class Worker:
    def __init__(self, models: dict[str, Served],
                 on_step: Callable[[Served, list[Event]], None] | None = None):
        self.models = models
        self._on_step = on_step
        self._routes: dict[Handle, _Route] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edge-genarm-steps", daemon=True)

    def start(self) -> None:
        # called on the loading thread, which hands decoding to the stepping thread: its idle
        # OpenMP pool, if it decoded before, would slow every decode there
        llama.release_openmp_threads()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        for model in self.models.values():
            model.scheduler.close()
            model.engine.close()

    # -- from any thread -----------------------------------------------------------------------
    def submit(self, model: Served, requests: list[Request],
               deliver: Callable[[Event | EngineError], None]) -> list[Handle]:
        with self._lock:
            if model.active + len(requests) > model.parallel + model.max_queue:
                raise QueueFull(f"{model.active} requests are running or waiting for "
                                f"{model.name}, the most it takes ({model.parallel} running, "
                                f"{model.max_queue} waiting); retry shortly")
            handles: list[Handle] = []
            try:
                for request in requests:
                    handles.append(model.scheduler.submit(request))
            except UserError:
                for handle in handles:
                    model.scheduler.cancel(handle)
                raise
            for handle in handles:
                self._routes[handle] = _Route(deliver, model)
            model.active += len(handles)
        self._wake.set()
        return handles

    def cancel(self, handles: list[Handle]) -> None:
        with self._lock:
            for handle in handles:
                route = self._routes.pop(handle, None)
                if route is not None:
                    route.model.active -= 1
                    route.model.scheduler.cancel(handle)
        self._wake.set()

    def interrupt(self, handles: list[Handle]) -> None:
        """End requests after their current token, their events still delivered: the last one
        says "interrupted", and their sequences keep what they hold for a later prompt."""
        with self._lock:
            for handle in handles:
                route = self._routes.get(handle)
                if route is not None:
                    route.model.scheduler.cancel(handle, interrupt=True)
        self._wake.set()

    # -- the stepping thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            busy = [m for m in self.models.values() if m.scheduler.busy]
            if not busy:
                self._wake.wait()
                self._wake.clear()
                continue
            for model in busy:
                try:
                    events = model.scheduler.step()
                except EngineError as exc:
                    self._fail(model, exc)
                    continue
                except Exception as exc:  # a bug: its requests fail, the thread goes on
                    traceback.print_exc()
                    self._fail(model, EngineError(f"internal error: {type(exc).__name__}: {exc}"))
                    continue
                model.cells_in_use = model.scheduler.cells_in_use
                if self._on_step is not None:
                    self._on_step(model, events)
                self._route(events)

    def _route(self, events) -> None:
        with self._lock:
            for event in events:
                route = self._routes.get(event.handle)
                if route is not None:  # else cancelled: nobody is listening
                    route.deliver(event)
            # a handle is done once the step ends: only then are all its events routed
            for handle in {e.handle for e in events if e.handle.done}:
                route = self._routes.pop(handle, None)
                if route is not None:
                    route.model.active -= 1

    def _fail(self, model: Served, exc: EngineError) -> None:
        """A failed decode fails every request of that model: each is told, and cancelled."""
        with self._lock:
            failed = [h for h, r in self._routes.items() if r.model is model]
            for handle in failed:
                route = self._routes.pop(handle)
                route.deliver(exc)
                model.active -= 1
                model.scheduler.cancel(handle)

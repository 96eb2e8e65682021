"""Batch generation over a Ray cluster: the driver hands lines to N actors, each a `Model`.

Contract:
- `ClusterModel(spec)` starts `spec.workers` Ray actors; each loads the spec's `Config` once on
  its own node (model references resolved there; a model that cannot load is one
  `UserError`), then runs its own continuous batch of the config's `parallel` sequences. An
  actor asks Ray for as many CPUs as its threads (1 when unset), so that Ray spreads actors
  over the nodes' cores.
- `as_completed(prompts, **options)` behaves as `Model.as_completed` (items, per-item options,
  `Completion`s as they finish, a bad item handed back with its error): each item is one actor
  call. Items are sorted by the text the model sees, so that items sharing a prefix (a system
  prompt, earlier turns) are neighbours, and each worker gets a contiguous share; a worker out
  of work takes from the far end of the longest other share. Every worker keeps 2 x `parallel`
  items in flight, so that its batch refills at once.
- A worker that dies (its process killed, its node gone): its items in flight go back to the
  queue and other workers run them; a replacement actor is started (at most `workers`
  replacements over the model's life) and takes work once loaded. An item in flight on
  `MAX_ATTEMPTS` deaths comes out with an error instead of killing a third worker.
- `generate`, `generate_batch`, `chat`: `model.Calls`', as `Model`'s; `stream` streams from one
  worker (no `should_stop`). `close()` kills the actors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..config import Config, RequestParams
from ..errors import UserError
from ..model import Calls, Completion, Model, is_token_ids
from . import ClusterSpec, connect, first_line

MAX_ATTEMPTS = 3
IN_FLIGHT = 2  # items in flight per worker, times its parallel sequences


class BatchWorker:
    """The actor: one `Model` on one node, its calls served from a thread pool (Ray's
    `max_concurrency`) so that concurrent items share the model's continuous batch."""

    def __init__(self, config: Config):
        self.model, self.error = None, None
        try:
            from .. import llama
            llama.set_verbose(config.load.verbose)
            self.model = Model(config)
        except UserError as exc:  # reported by ready(), as one line on the driver
            self.error = str(exc)

    def ready(self) -> dict:
        import ray
        return {"error": self.error, "pid": os.getpid(), "host": socket.gethostname(),
                "node": ray.get_runtime_context().get_node_id()}

    def run(self, index: int, item, params: RequestParams | None, options: dict
            ) -> Completion:
        done = next(self.model.as_completed([item], params, **options))
        done.index = index
        return done

    def stream(self, prompt, params: RequestParams | None, options: dict):
        yield from self.model.stream(prompt, params, **options)


@dataclass
class _Slot:
    """One worker place: its current actor, whether it is loaded, its share of the items."""
    actor: object
    ready: object                 # the ObjectRef of actor.ready() while it loads, else None
    share: deque = field(default_factory=deque)
    busy: int = 0
    info: dict = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.ready is None and self.actor is not None


class ClusterModel(Calls):
    def __init__(self, spec: ClusterSpec):
        if spec.workers is not None:
            spec.check()
        self.config = spec.config
        self.ray = connect(spec.address, self.config.load.verbose)
        if spec.workers is None:  # one per node
            spec = dataclasses.replace(spec, workers=sum(n["Alive"] for n in self.ray.nodes()))
        self.spec, self.parallel = spec, self.config.load.parallel
        threads = self.config.load.threads or 1
        self._check_room(threads)
        self._remote = self.ray.remote(num_cpus=threads, max_concurrency=IN_FLIGHT * self.parallel
                                       + 1)(BatchWorker)
        self._replacements = spec.workers
        self.slots = [self._start() for _ in range(spec.workers)]
        self._closed = False
        try:
            for slot in self.slots:
                self._await(slot, fatal=True)
        except BaseException:
            self.close()
            raise

    # -- workers ----------------------------------------------------------------------------
    def _start(self) -> _Slot:
        actor = self._remote.remote(self.spec.config)
        return _Slot(actor, actor.ready.remote())

    def _check_room(self, threads: int) -> None:
        """Actors that no node can place would wait forever: refuse them in one line."""
        cpus = self.ray.cluster_resources().get("CPU", 0)
        if self.spec.workers * threads > cpus:
            raise UserError(f"{self.spec.workers} workers of {threads} threads need "
                            f"{self.spec.workers * threads} CPUs and the Ray cluster has "
                            f"{cpus:g}; lower --workers or --threads, or add nodes")

    def _await(self, slot: _Slot, fatal: bool) -> None:
        """A loading worker's answer: loaded, a load error (one line), or its death."""
        from ray.exceptions import RayActorError
        try:
            info = self.ray.get(slot.ready)
        except RayActorError as exc:
            if fatal:
                raise UserError(f"a Ray worker died while loading the models "
                                f"({first_line(exc)}); run with --verbose for its log") \
                    from None
            self._lost(slot)
            return
        self._loaded(slot, info)

    def _loaded(self, slot: _Slot, info: dict) -> None:
        if info["error"]:
            raise UserError(f"a Ray worker on {info['host']} could not load the models: "
                            f"{info['error']}")
        slot.ready, slot.info = None, info

    def _lost(self, slot: _Slot) -> None:
        """A worker died: start a replacement in its place while the budget lasts."""
        if slot.actor is None:
            return
        slot.actor, slot.ready, slot.busy = None, None, 0
        if self._replacements > 0:
            self._replacements -= 1
            fresh = self._start()
            slot.actor, slot.ready = fresh.actor, fresh.ready

    @property
    def workers(self) -> list[dict]:
        """Each live worker's host, node id and process id."""
        return [s.info for s in self.slots if s.live]

    # -- the calls ---------------------------------------------------------------------------
    def as_completed(self, prompts: Iterable, params: RequestParams | None = None, **options
                     ) -> Iterator[Completion]:
        """See the module docstring."""
        self._check_open()
        items = list(prompts)
        system = options.get("system", (params or self.config.request).system)
        for slot, share in zip(self.slots, prefix_shares(items, system, len(self.slots))):
            slot.share = share
        pending: dict = {}  # ObjectRef -> (slot, the actor it went to, index)
        attempts: Counter = Counter()
        try:
            while True:
                self._fill(items, (params, options), pending)
                loading = {s.ready: s for s in self.slots if s.ready is not None}
                left = any(s.share for s in self.slots)
                if not pending and not (left and loading):
                    if left:
                        raise UserError("every Ray worker died and none could be restarted; "
                                        "run again (a batch job: with --resume)")
                    return
                ready, _ = self.ray.wait(list(pending) + list(loading), num_returns=1)
                for ref in ready:
                    if ref in loading:
                        self._await(loading[ref], fatal=False)
                        continue
                    done = self._collect(ref, *pending.pop(ref), attempts)
                    if done is not None:
                        yield done
        finally:
            for ref in pending:
                self.ray.cancel(ref)

    def _fill(self, items: list, call: tuple, pending: dict) -> None:
        """Give every live worker items up to its depth: its own share first, then stolen."""
        depth = IN_FLIGHT * self.parallel
        for slot in self.slots:
            while slot.live and slot.busy < depth:
                i = _take(slot, self.slots)
                if i is None:
                    break
                slot.busy += 1
                pending[slot.actor.run.remote(i, items[i], *call)] = (slot, slot.actor, i)

    def _collect(self, ref, slot: _Slot, actor, i: int, attempts: Counter
                 ) -> Completion | None:
        """The item's completion, or None when its worker died and the item went back."""
        from ray.exceptions import RayActorError, RayTaskError
        try:
            done = self.ray.get(ref)
        except RayTaskError as exc:  # a bug inside the worker: this item fails, the rest go on
            if actor is slot.actor:
                slot.busy -= 1
            return Completion(i, [], UserError(f"a Ray worker failed on this item: "
                                               f"{first_line(exc.cause or exc)}"))
        except RayActorError:
            if actor is slot.actor:  # the first of its items to fail: replace the actor
                self._lost(slot)
            attempts[i] += 1
            if attempts[i] >= MAX_ATTEMPTS:
                return Completion(i, [], UserError(
                    f"{MAX_ATTEMPTS} Ray workers died while running this item; it was not "
                    "tried again"))
            slot.share.appendleft(i)
            return None
        if actor is slot.actor:
            slot.busy -= 1
        return done

    def stream(self, prompt, params: RequestParams | None = None, **options) -> Iterator:
        self._check_open()
        if "should_stop" in options:
            raise UserError("stream(should_stop=...) runs on one machine; on a cluster close "
                            "the iterator to cancel")
        live = [s for s in self.slots if s.live]
        system = options.get("system", (params or self.config.request).system)
        slot = live[hash(_prefix_key(prompt, system)[:256]) % len(live)]
        for ref in slot.actor.stream.options(num_returns="streaming").remote(prompt, params,
                                                                             options):
            yield self.ray.get(ref)

    def close(self) -> None:
        self._closed = True
        for slot in getattr(self, "slots", []):
            if slot.actor is not None:
                self.ray.kill(slot.actor)
                slot.actor, slot.ready = None, None

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("this model is closed; load it again")


def prefix_shares(items: list, system: str | None, n: int) -> list[deque]:
    """The items' indices in n contiguous runs of the order of the text the model sees first:
    items that share a prefix are neighbours in it, so mostly in one run."""
    order = sorted(range(len(items)), key=lambda i: _prefix_key(items[i], system))
    return [deque(order[k * len(order) // n:(k + 1) * len(order) // n]) for k in range(n)]


def _take(slot: _Slot, slots: list[_Slot]) -> int | None:
    if slot.share:
        return slot.share.popleft()
    victim = max(slots, key=lambda s: len(s.share))
    return victim.share.pop() if victim.share else None


def _prefix_key(item, system: str | None) -> str:
    """The text the model will see first, for grouping items that share a prefix: the system
    message, then the messages or the prompt (token ids as their digits)."""
    if isinstance(item, dict):
        system = item.get("system", system)
        item = item.get("prompt", item.get("messages"))
    if isinstance(item, str):
        return json.dumps([system, item])[:-2]  # open-ended: a prompt may go on past it
    if is_token_ids(item):
        return " ".join(map(str, item))
    return json.dumps([system, item], ensure_ascii=False)

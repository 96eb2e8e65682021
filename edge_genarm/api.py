"""The Python API: load the models once, then generate from any thread.

    import edge_genarm

    with edge_genarm.load("demo") as model:                 # a preset, or base=/arms= paths
        result = model.generate("Tell me about rain.", arms={"positive": 1.5}, max_tokens=64)
        print(result.text, result.finish_reason, result.usage.completion_tokens)
        for chunk in model.stream("Hi!", temperature=0.7):
            print(chunk.text, end="", flush=True)
        results = model.generate_batch(["Hi!", {"prompt": "Hello", "arms": {"positive": 0}}])
        for done in model.as_completed(["Hi!", "Hello"]):      # as each finishes
            print(done.index, done.error or done.results[0].text)
        reply = model.chat([{"role": "user", "content": "Hi!"}])

Contract:
- `load(preset=None, **options)` takes the command line's options by their Python names
  (`base`, `arms`, `ctx_size`, `n_gpu_layers`, `temperature`, `max_tokens`, `system`, ...; the
  options of `edge-genarm generate --help`) over the preset's defaults, and checks them as the
  commands do (`UserError`, one line). `arms` is a list of "PATH[:ALPHA]" (or a dict PATH ->
  ALPHA), `alphas` a dict NAME -> weight, `parallel` how many sequences decode together.
  The options' environment variables are not read (a program says what it wants); models.toml
  files are merged as for the commands.
- Every call (`generate`, `stream`, `generate_batch`, `as_completed`, `chat`) takes request
  options as keyword arguments over the loaded defaults: the sampling settings (`temperature`,
  `top_k`, `top_p`, `min_p`, `greedy`, the penalties), `max_tokens`, `stop`, `seed`, `system`,
  `arms` (weights by ARM name), `n`, `logprobs`, `method`, `reward_weight`, `candidates`,
  `samples`, `ignore_eos`. A bad value raises `UserError` before anything runs;
  `as_completed` instead hands a bad item back with its error and runs the others.
- A prompt is a string (the chat template and `system` applied), a list of chat messages, or
  a list of token ids (fed as they are). `stream(..., should_stop=f)` ends the answer after
  the chunk where f() turns true, keeping it (finish reason "interrupted").
- Calls are safe from many threads at once: one stepping thread decodes every live request
  together (continuous batching, shared prefixes), as the server does. A stream closed early
  cancels its request. `close()` (or leaving the `with` block) stops the thread and frees the
  models; a call after that raises `UserError`.
"""

from __future__ import annotations

import dataclasses
import queue
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import click

from .engine import Engine
from .errors import EngineError, UserError
from .generation import Answers, Result, chat_template, encode_messages, encode_prompt, \
    with_system
from .options import CALL_FIELDS, SAMPLING_FIELDS, GenerationOptions, generation_options, \
    sequence_breakers
from .scheduler import Request, Scheduler, TokenLogprob, Usage
from .worker import Served, Worker

__all__ = ["load", "Model", "Result", "Chunk", "Completion", "UserError", "EngineError"]

_CALL = SAMPLING_FIELDS | CALL_FIELDS | {"system"}


@dataclass
class Chunk:
    """One piece of a streamed answer: the text that became final with this token."""
    text: str
    token: int | None
    index: int = 0                       # which of the request's n answers
    logprob: TokenLogprob | None = None  # with logprobs=
    finish_reason: str | None = None     # on the answer's last chunk
    usage: Usage | None = None           # on the answer's last chunk
    result: Result | None = None         # the whole answer, on the request's last chunk


@dataclass
class Completion:
    """One item of `Model.as_completed`: its place in the input and its answers (n of them), or
    the error that kept it from running."""
    index: int
    results: list[Result]
    error: UserError | None = None
    request: Request | None = None  # the settings it ran with, every default filled in


def _option_defaults() -> dict[str, Any]:
    """The command line's defaults, read from the click options themselves."""
    command = generation_options(click.Command("load", callback=lambda **kw: None))
    ctx = click.Context(command)
    out = {}
    for p in command.params:
        value = p.get_default(ctx)
        # a repeatable option without a default has click's "unset" marker: none given
        out[p.name] = tuple(value) if isinstance(value, (list, tuple)) else \
            () if p.multiple else value
    return out


def load(preset: str | None = None, *, arms: Iterable[str] | dict | None = None,
         alphas: dict[str, float] | None = None, parallel: int = 4,
         ray: bool | str | None = None, workers: int | None = None, **options):
    """Load a preset (or base= and arms=) with these options; see the module docstring.
    `ray=True` (or a Ray address) loads it on `workers` actors of a Ray cluster instead (one
    per node by default; the `cluster` extra): a `ClusterModel` with the same calls."""
    kw, explicit = _load_kwargs(preset, arms, alphas, options)
    if not isinstance(parallel, int) or parallel < 1:
        raise UserError(f"parallel must be a whole number of at least 1, got {parallel!r}")
    if ray is None or ray is False:
        if workers is not None:
            raise UserError("workers= spreads the model over a Ray cluster: add ray=True (or "
                            "a Ray address)")
        return Model(GenerationOptions.from_kwargs(kw, explicit), parallel, name=preset)
    from .cluster import ClusterSpec
    from .cluster.batch import ClusterModel
    address = None if ray is True else str(ray)
    return ClusterModel(ClusterSpec(address, workers, kw, explicit, name=preset), parallel)


def _load_kwargs(preset: str | None, arms, alphas, options: dict) -> tuple[dict, set[str]]:
    """`load`'s arguments as the command line's kwargs, and the names the caller gave."""
    defaults = _option_defaults()
    unknown = sorted(set(options) - set(defaults) - {"alpha_overrides"})
    if unknown:
        raise UserError(f"load(): unknown option {unknown[0]!r}; the options are "
                        f"{', '.join(sorted(set(defaults) - {'preset'}))}")
    given = dict(options)
    if arms is not None:
        given["arms"] = tuple(f"{k}:{v}" for k, v in arms.items()) if isinstance(arms, dict) \
            else tuple(map(str, arms))
    if alphas:
        given["alpha_overrides"] = tuple(f"{k}={v}" for k, v in alphas.items())
    if isinstance(given.get("arm_gpu_layers"), dict):
        given["arm_gpu_layers"] = tuple(f"{k}={v}" for k, v in given["arm_gpu_layers"].items())
    for name in ("stop", "dry_sequence_breakers"):
        if isinstance(given.get(name), str):
            given[name] = (given[name],)
    for name in ("base", "reward_model", "draft_model", "models_file"):
        if given.get(name) is not None:
            given[name] = str(given[name])
    return defaults | given | {"preset": preset}, set(given)


class Model:
    """Loaded models and the thread that steps them; see the module docstring."""

    def __init__(self, opts: GenerationOptions, parallel: int = 4, name: str | None = None,
                 share_prefixes: bool = True):
        """Load the models of checked options (what `load` and the commands build);
        `share_prefixes=False` decodes every prompt whole, to measure what sharing saves."""
        # best-of-n's samples need sequences of their own beside the parallel requests
        opts = dataclasses.replace(opts, context=dataclasses.replace(
            opts.context, n_seq_max=max(parallel, opts.context.n_seq_max)))
        name = name or opts.base.stem
        self.options = opts
        self.engine = Engine.load(opts.engine_config())
        try:
            template = chat_template(self.engine, opts.chat_template)
            # no queue limit: a program's own calls wait their turn
            self._served = Served(name, opts, self.engine,
                                  Scheduler(self.engine, share_prefixes), template,
                                  parallel, max_queue=1 << 30)
            self._worker = Worker({name: self._served})
            self._worker.start()
        except BaseException:
            self.engine.close()
            raise
        self._closed = False

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler the stepping thread runs (to inspect its sequences, not to step it)."""
        return self._served.scheduler

    @property
    def arms(self) -> dict[str, float]:
        """The loaded ARMs and their default weights."""
        return {a.name: a.alpha for a in self.engine.arms}

    # -- the calls ---------------------------------------------------------------------------
    def generate(self, prompt: str | list[dict] | list[int], **options) -> Result:
        """One answer (the first, for n > 1) to a prompt, a list of chat messages, or token ids
        (fed as they are: no template, no system message)."""
        return self._results([self._request(prompt, options)])[0][0]

    def stream(self, prompt: str | list[dict] | list[int], *,
               should_stop: Callable[[], bool] | None = None, **options) -> Iterator[Chunk]:
        """The answer's pieces as they become final; the last one has finish_reason, usage
        and the whole `Result`. Closing the iterator early cancels the request;
        `should_stop()`, asked after each piece, ends the answer there once it returns true
        (finish_reason "interrupted", the text so far kept)."""
        items, handles = self._submit([self._request(prompt, options)])
        answers = Answers(list(self.arms))
        stopping = False
        try:
            for event in _events(items, handles):
                results = answers.add(event)
                yield Chunk(event.text, event.token, event.index, event.logprob,
                            event.finish_reason, event.usage,
                            None if results is None else results[0])
                if not stopping and should_stop is not None and should_stop():
                    stopping = True
                    self._worker.interrupt(handles)
        finally:
            self._worker.cancel([h for h in handles if not h.done])

    def generate_batch(self, prompts: Iterable[str | list[dict] | dict], **options
                       ) -> list[Result]:
        """Answers to many prompts, decoded together, in order. An item is a prompt, a list of
        messages, or a dict {"prompt" or "messages", plus request options of its own}."""
        requests = [self._item_request(item, options) for item in prompts]
        return [answers[0] for answers in self._results(requests)]

    def as_completed(self, prompts: Iterable[str | list[dict] | dict], **options
                     ) -> Iterator[Completion]:
        """Each item's answers as soon as they are all done (items as for `generate_batch`).
        An item that cannot run (a bad option, a prompt longer than the context) comes out at
        once with its `error`, and the others go on. Closing the iterator cancels the rest."""
        items: queue.Queue = queue.Queue()
        index: dict = {}  # handle -> the item's place
        try:
            for i, item in enumerate(prompts):
                try:
                    [handle] = self._worker.submit(self._served,
                                                   [self._item_request(item, options)],
                                                   items.put)
                except UserError as exc:
                    yield Completion(i, [], exc)
                    continue
                index[handle] = i
            for handle, results in self._gather(items, list(index)):
                yield Completion(index[handle], results, request=handle.request)
        finally:
            self._worker.cancel([h for h in index if not h.done])

    def chat(self, messages: list[dict], **options) -> Result:
        """The assistant's next turn in a conversation (the chat template applied)."""
        if not isinstance(messages, list) or not messages:
            raise UserError("chat() takes a non-empty list of {'role', 'content'} messages")
        return self.generate(messages, **options)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._worker.stop()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def _item_request(self, item, options: dict) -> Request:
        """A batch item's request: its own options (a dict item's) over the call's."""
        if not isinstance(item, dict):
            return self._request(item, options)
        own = {k: v for k, v in item.items() if k not in ("prompt", "messages")}
        shared = options
        if "temperature" in own:  # the item's temperature decides greedy, as in a call
            shared = {k: v for k, v in options.items() if k != "greedy"}
        text = item.get("prompt", item.get("messages"))
        if text is None:
            raise UserError('a batch item that is a dict needs "prompt" or "messages"')
        return self._request(text, shared | own)

    def _request(self, prompt, options: dict) -> Request:
        """A checked scheduler request: the options over the loaded defaults."""
        if self._closed:
            raise UserError("this model is closed; load it again")
        unknown = sorted(set(options) - _CALL)
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r}; a call takes "
                            f"{', '.join(sorted(_CALL))}")
        given = dict(options)
        if given.get("dry_sequence_breakers") is not None:  # the command line's escapes
            breakers = given["dry_sequence_breakers"]
            given["dry_sequence_breakers"] = sequence_breakers(
                [breakers] if isinstance(breakers, str) else breakers)
        ids = self._encode(prompt, options.get("system", self.options.system))
        return self.options.call(ids, given)

    def _encode(self, prompt, system: str | None) -> list[int]:
        if isinstance(prompt, (list, tuple)) and prompt and \
                all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)  # token ids, fed as they are
        if isinstance(prompt, str):
            return encode_prompt(self.engine, prompt, system, self.options.raw,
                                 self.options.chat_template)
        if self.options.raw or self._served.template is None:
            why = "--raw turns it off" if self.options.raw else \
                f"{self._served.name} has none"
            raise UserError(f"messages need the chat template and {why}; give a prompt string")
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise UserError("messages must be a list of {'role', 'content'} dicts")
        return encode_messages(self.engine, with_system(list(prompt), system),
                               self._served.template)

    def _submit(self, requests: list[Request]):
        items: queue.Queue = queue.Queue()
        handles = self._worker.submit(self._served, requests, items.put)
        return items, handles

    def _results(self, requests: list[Request]) -> list[list[Result]]:
        """Every request's answers, each a `Result`, in order."""
        items, handles = self._submit(requests)
        try:
            done = dict(self._gather(items, handles))
        finally:
            self._worker.cancel([h for h in handles if not h.done])
        return [done[h] for h in handles]

    def _gather(self, items: queue.Queue, handles: list) -> Iterator[tuple[object, list[Result]]]:
        """(handle, its answers as `Result`s) as each request ends, from the events delivered."""
        answers = Answers([a.name for a in self.engine.arms])
        for event in _events(items, handles):
            results = answers.add(event)
            if results is not None:
                yield event.handle, results


def _events(items: queue.Queue, handles) -> Iterator:
    """The handles' events as the stepping thread delivers them, until every answer has ended
    (its last event carries the finish reason; best-of-n returns one answer)."""
    left = sum(h.policy.returned for h in handles)
    while left:
        item = items.get()
        if isinstance(item, EngineError):
            raise item
        left -= item.finish_reason is not None
        yield item

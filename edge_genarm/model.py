"""A loaded model and its calls: generate, stream, generate_batch, as_completed, chat.

Contract:
- `Calls` is what every loaded model offers (`Model` on this machine, `cluster.batch
  .ClusterModel` over Ray): `generate`, `generate_batch` and `chat` are built on the
  implementation's `as_completed`, and every call takes a `RequestParams` (default: the loaded
  defaults) and request options by name over it (`config.RequestParams` declares them: the
  sampling settings, `max_tokens`, `stop`, `seed`, `system`, `arms` (weights by ARM name), `n`,
  `logprobs`, `method`, `reward_weight`, `candidates`, `samples`, `ignore_eos`, `speculative`,
  `draft_tokens`). A bad value raises `UserError` before anything runs; `as_completed` instead
  hands a bad item back with its error and runs the others.
- A prompt is a string (the chat template and `system` applied), a list of chat messages, or
  a list of token ids (fed as they are). `stream(..., should_stop=f)` ends the answer after
  the chunk where f() turns true, keeping it (finish reason "interrupted").
- `Model`'s calls are safe from many threads at once: one stepping thread decodes every live
  request together (continuous batching, shared prefixes), as the server does. A stream
  closed early cancels its request. `close()` (or leaving the `with` block) stops the thread
  and frees the models; a call after that raises `UserError`.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

from .config import Config, RequestParams
from .errors import EngineError, UserError
from .generation import Answers, Result, encode_messages, encode_prompt, with_system
from .options import call
from .scheduler import Scheduler, TokenLogprob, Usage
from .worker import Worker, load_served

__all__ = ["Calls", "Model", "Chunk", "Completion", "is_token_ids"]


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
    request: RequestParams | None = None  # the settings it ran with, every default filled in


def is_token_ids(prompt) -> bool:
    """Whether a prompt is token ids (fed as they are) rather than text or messages."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and \
        all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


class Calls:
    """The calls every loaded model offers, built on its `as_completed`."""
    config: Config

    def as_completed(self, prompts: Iterable, params: RequestParams | None = None, **options
                     ) -> Iterator[Completion]:
        raise NotImplementedError

    @property
    def arms(self) -> dict[str, float]:
        """The loaded ARMs and their default weights."""
        return {a.name: a.alpha for a in self.config.load.named_arms()}

    def generate(self, prompt: str | list[dict] | list[int],
                 params: RequestParams | None = None, **options) -> Result:
        """One answer (the first, for n > 1) to a prompt, a list of chat messages, or token ids
        (fed as they are: no template, no system message)."""
        return self.generate_batch([prompt], params, **options)[0]

    def generate_batch(self, prompts: Iterable[str | list[dict] | dict],
                       params: RequestParams | None = None, **options) -> list[Result]:
        """Answers to many prompts, decoded together, in order. An item is a prompt, a list of
        messages, or a dict {"prompt" or "messages", plus request options of its own}; a bad
        item raises its `UserError` before anything runs."""
        prompts = list(prompts)
        done: dict[int, Completion] = {}
        for c in self.as_completed(prompts, params, **options):
            if c.error is not None:
                raise c.error
            done[c.index] = c
        return [done[i].results[0] for i in range(len(prompts))]

    def chat(self, messages: list[dict], params: RequestParams | None = None, **options
             ) -> Result:
        """The assistant's next turn in a conversation (the chat template applied)."""
        if not isinstance(messages, list) or not messages:
            raise UserError("chat() takes a non-empty list of {'role', 'content'} messages")
        return self.generate(messages, params, **options)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class Model(Calls):
    """Loaded models and the thread that steps them; see the module docstring."""

    def __init__(self, config: Config, share_prefixes: bool = True):
        """Load the models of a checked `Config` (what `load` and the commands build);
        `share_prefixes=False` decodes every prompt whole, to measure what sharing saves."""
        self.config = config
        # no queue limit: a program's own calls wait their turn
        [self._served] = load_served({config.name: config}, max_queue=1 << 30,
                                     share_prefixes=share_prefixes).values()
        self.engine = self._served.engine
        try:
            self._worker = Worker({config.name: self._served})
            self._worker.start()
        except BaseException:
            self.engine.close()
            raise
        self._closed = False

    @property
    def template(self) -> str | None:
        """The chat template its prompts and messages go through (None: the model has none)."""
        return self._served.template

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler the stepping thread runs (to inspect its sequences, not to step it)."""
        return self._served.scheduler

    # -- the calls (generate and chat: `Calls`') ----------------------------------------------
    def generate_batch(self, prompts: Iterable[str | list[dict] | dict],
                       params: RequestParams | None = None, **options) -> list[Result]:
        requests = [self._item_request(item, options, params) for item in prompts]
        return [answers[0] for answers in self._results(requests)]

    generate_batch.__doc__ = Calls.generate_batch.__doc__

    def stream(self, prompt: str | list[dict] | list[int], params: RequestParams | None = None,
               *, should_stop: Callable[[], bool] | None = None, **options) -> Iterator[Chunk]:
        """The answer's pieces as they become final; the last one has finish_reason, usage
        and the whole `Result`. Closing the iterator early cancels the request;
        `should_stop()`, asked after each piece, ends the answer there once it returns true
        (finish_reason "interrupted", the text so far kept)."""
        items, handles = self._submit([self._request(prompt, options, params)])
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

    def as_completed(self, prompts: Iterable[str | list[dict] | dict],
                     params: RequestParams | None = None, **options) -> Iterator[Completion]:
        """Each item's answers as soon as they are all done (items as for `generate_batch`).
        An item that cannot run (a bad option, a prompt longer than the context) comes out at
        once with its `error`, and the others go on. Closing the iterator cancels the rest."""
        items: queue.Queue = queue.Queue()
        index: dict = {}  # handle -> the item's place
        try:
            for i, item in enumerate(prompts):
                try:
                    [handle] = self._worker.submit(self._served,
                                                   [self._item_request(item, options,
                                                                       params)],
                                                   items.put)
                except UserError as exc:
                    yield Completion(i, [], exc)
                    continue
                index[handle] = i
            for handle, results in self._gather(items, list(index)):
                yield Completion(index[handle], results, request=handle.request)
        finally:
            self._worker.cancel([h for h in index if not h.done])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._worker.stop()

    # -- requests ----------------------------------------------------------------------------
    def _item_request(self, item, options: dict, params: RequestParams | None = None
                      ) -> RequestParams:
        """A batch item's request: its own options (a dict item's) over the call's."""
        if not isinstance(item, dict):
            return self._request(item, options, params)
        own = {k: v for k, v in item.items() if k not in ("prompt", "messages")}
        shared = options
        if "temperature" in own:  # the item's temperature decides greedy, as in a call
            shared = {k: v for k, v in options.items() if k != "greedy"}
        text = item.get("prompt", item.get("messages"))
        if text is None:
            raise UserError('a batch item that is a dict needs "prompt" or "messages"')
        return self._request(text, shared | own, params)

    def _request(self, prompt, options: dict, params: RequestParams | None = None
                 ) -> RequestParams:
        """A checked scheduler request: the options over `params` (default: the loaded
        defaults)."""
        if self._closed:
            raise UserError("this model is closed; load it again")
        request = call(params or self.config.request, (), options)
        return replace(request, prompt_ids=tuple(self._encode(prompt, request.system)))

    def _encode(self, prompt, system: str | None) -> list[int]:
        if is_token_ids(prompt):
            return list(prompt)  # fed as they are
        if isinstance(prompt, str):
            return encode_prompt(self.engine, prompt, system, self.config.load.raw,
                                 self.config.load.chat_template)
        if self.config.load.raw or self._served.template is None:
            why = "--raw turns it off" if self.config.load.raw else \
                f"{self._served.name} has none"
            raise UserError(f"messages need the chat template and {why}; give a prompt string")
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise UserError("messages must be a list of {'role', 'content'} dicts")
        return encode_messages(self.engine, with_system(list(prompt), system),
                               self._served.template)

    def _submit(self, requests: list[RequestParams]):
        items: queue.Queue = queue.Queue()
        handles = self._worker.submit(self._served, requests, items.put)
        return items, handles

    def _results(self, requests: list[RequestParams]) -> list[list[Result]]:
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

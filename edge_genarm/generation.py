"""Generation on the scheduler, as layered generators (as in mlx-lm):

    Scheduler.step  one llama.cpp batch per context for every live sequence (scheduler.py)
    stream          one request's events, stepping the scheduler until the request is done
    generate        joins a stream into a `Result` (text, tokens, usage)

and the prompt side: the chat template and the token ids a prompt becomes.

Contract: the same request (prompt ids, sampling settings, seed, ARM weights) on the same models
gives the same tokens. `should_stop()` turning true ends a request after its current token, with
finish reason "interrupted" (its cache is kept for the next turn).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from .engine import Engine
from .errors import UserError
from .scheduler import Event, Handle, Scheduler, Usage
from .templates import build_messages, render_chat


@dataclass
class Result:
    text: str
    tokens: list[int]
    prompt_ids: list[int]
    seed: int
    alphas: dict[str, float]
    usage: Usage
    method: dict = field(default_factory=lambda: {"method": "genarm"})  # and its settings
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when asked for

    @property
    def finish_reason(self) -> str:
        return self.usage.finish_reason

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens decoded; the rest were copied from a cache."""
        return self.usage.prompt_tokens - self.usage.cached_tokens

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "prompt_ids": self.prompt_ids,
                "seed": self.seed, "alphas": self.alphas, **self.method, **self.usage.to_dict()}


def encode_prompt(engine: Engine, prompt: str, system: str | None = None,
                  raw: bool = False, fallback_template: str | None = None) -> list[int]:
    """The token ids the base (and every ARM) is fed for a user prompt."""
    if raw:
        if system:
            raise UserError("--system needs the chat template; drop --raw or drop --system")
        return engine.model.tokenize(prompt, add_special=True)
    template = chat_template(engine, fallback_template)
    if template is None:
        raise UserError(f"{engine.model.path} has no chat template (tokenizer.chat_template); "
                        "pass --raw to send the prompt as is")
    return encode_messages(engine, build_messages(prompt, system), template)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The messages, led by `system` (--system, a preset's) where they bring none of their own."""
    if not system or any(m.get("role") in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": system}] + list(messages)


def chat_template(engine: Engine, fallback: str | None = None) -> str | None:
    """The base's own chat template, else the fallback (a preset's), else None."""
    return engine.model.meta("tokenizer.chat_template") or fallback


def encode_messages(engine: Engine, messages: list[dict], template: str) -> list[int]:
    """A conversation through the chat template, the assistant's turn opened, as token ids."""
    text = render_chat(template, messages, bos_token=_special_text(engine, "bos"),
                       eos_token=_special_text(engine, "eos"))
    # As transformers does after apply_chat_template: the template already placed any BOS.
    return engine.model.tokenize(text, add_special=False)


def _special_text(engine: Engine, name: str) -> str:
    token = engine.model.special_token(name)
    return engine.model.token_text(token) if token >= 0 else ""


def stream(scheduler: Scheduler, handle: Handle,
           should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
    """Step the scheduler until `handle` is done, yielding its events (others' are dropped: the
    caller owns the scheduler alone)."""
    interrupted = False
    while not handle.done:
        for event in scheduler.step():
            if event.handle is handle:
                yield event
        if not interrupted and should_stop is not None and should_stop():
            scheduler.cancel(handle, interrupt=True)
            interrupted = True


def generate(scheduler: Scheduler, handle: Handle, on_text=None,
             should_stop: Callable[[], bool] | None = None) -> Result:
    """Run a submitted request to its end; `on_text(str)` sees each piece of text as it becomes
    final."""
    request = handle.request
    texts: list[str] = []
    tokens: list[int] = []
    usage = None
    for event in stream(scheduler, handle, should_stop):
        if event.token is not None:
            tokens.append(event.token)
        if event.text:
            texts.append(event.text)
            if on_text is not None:
                on_text(event.text)
        usage = event.usage or usage
    engine = scheduler.engine
    weights = handle.weights
    return Result(text="".join(texts), tokens=tokens, prompt_ids=list(request.prompt_ids),
                  seed=request.seed, alphas={a.name: float(w) for a, w in
                                             zip(engine.arms, weights)}, usage=usage,
                  method=method_of(request))


def method_of(request) -> dict:
    """How a request was guided, for its record: the method, and a tokenwise one's settings."""
    if request.method == "genarm":
        return {"method": "genarm"}
    if request.method == "best-of-n":
        return {"method": "best-of-n", "samples": request.samples}
    return {"method": request.method, "reward_weight": request.reward_weight,
            "candidates": request.candidates}

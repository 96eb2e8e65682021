"""Both ends of a request: the token ids a prompt becomes (the chat template), and the output
processor that joins the scheduler's events into `Result`s (as vLLM splits its scheduler from
its output processor).

Contract: the same request (prompt ids, sampling settings, seed, ARM alphas) on the same models
gives the same tokens. `Answer.add(event)` gathers one answer's events (the server keeps one per
OpenAI choice); `Answers.add(event)` returns a request's `Result`s once all its answers
have ended; `run_to_end(scheduler, handles)` steps a scheduler on the caller's thread until the
handles are done (the Python API steps it on a thread of its own instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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
    # a JSON-constrained answer that ended where its JSON does, parsed: an instance of the
    # call's Pydantic response_format, else the JSON value (None otherwise)
    parsed: Any = None

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


def encode_messages(engine: Engine, messages: list[dict], template: str,
                    tools: list[dict] | None = None) -> list[int]:
    """A conversation through the chat template (given `tools`, OpenAI's tool objects, where
    it renders them), the assistant's turn opened, as token ids."""
    text = render_chat(template, messages, bos_token=_special_text(engine, "bos"),
                       eos_token=_special_text(engine, "eos"), tools=tools)
    # As transformers does after apply_chat_template: the template already placed any BOS.
    return engine.model.tokenize(text, add_special=False)


def _special_text(engine: Engine, name: str) -> str:
    token = engine.model.special_token(name)
    return engine.model.token_text(token) if token >= 0 else ""


@dataclass
class Answer:
    """One answer as its events arrive: tokens, text pieces and log-probs, and its usage once
    it has ended (the server keeps one per choice; `Answers` one per answer of a request)."""
    index: int
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when asked for
    usage: Usage | None = None

    def add(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        self.pieces.append(event.text)
        self.usage = event.usage or self.usage

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Answers:
    """The output processor: a scheduler's events joined into `Result`s. `add(event)` returns a
    request's answers (n of them; best-of-n's one) once the last of them has ended, else None."""

    def __init__(self, arm_names: list[str]):
        self.names = arm_names
        self.parts: dict[Handle, dict[int, Answer]] = {}

    def add(self, event: Event) -> list[Result] | None:
        h = event.handle
        answers = self.parts.setdefault(h, {})
        answers.setdefault(event.index, Answer(event.index)).add(event)
        if event.usage is None or \
                sum(a.usage is not None for a in answers.values()) < h.policy.returned:
            return None
        del self.parts[h]
        alphas = dict(zip(self.names, map(float, h.policy.alphas)))
        return [Result(text=a.text, tokens=a.tokens, prompt_ids=list(h.request.prompt_ids),
                       seed=h.request.seed + j, alphas=alphas, usage=a.usage,
                       method=method_of(h.request), logprobs=a.logprobs,
                       parsed=parsed(h.request, a))
                for j, a in sorted(answers.items())]


def parsed(request, answer: Answer) -> Any:
    """A JSON Schema answer that ended where its JSON does, parsed (None otherwise)."""
    if request.json_schema is None or answer.usage.finish_reason != "stop":
        return None
    try:
        if request.response_model is not None:
            return request.response_model.model_validate_json(answer.text)
        return json.loads(answer.text)
    except ValueError:  # a schema keyword the grammar could not hold (the class's validator)
        return None


def run_to_end(scheduler: Scheduler, handles: list[Handle]) -> list[list[Result]]:
    """Step a scheduler that the calling thread owns until the handles are done: each one's
    answers. (Programs use the Python API, whose own thread steps the scheduler.)"""
    answers = Answers([a.name for a in scheduler.engine.arms])
    done = {}
    for event in scheduler.run(handles):
        results = answers.add(event)
        if results is not None:
            done[event.handle] = results
    return [done[h] for h in handles]


def method_of(request) -> dict:
    """How a request was guided, for its record: the method, and a tokenwise one's settings."""
    if request.method == "genarm":
        return {"method": "genarm"} | ({"speculative": request.speculative}
                                       if request.drafts else {})
    if request.method == "best-of-n":
        return {"method": "best-of-n", "samples": request.samples}
    if request.method == "search":
        return {"method": "search", "search_width": request.search_width,
                "beams": request.beams, "segment": request.segment,
                "search_score": request.search_score} | (
                    {"search_fluency": request.search_fluency} if request.search_fluency else {})
    return {"method": request.method, "reward_weight": request.reward_weight,
            "candidates": request.candidates}

"""Generation as layered generators over an `Engine` (as in mlx-lm):

    generate_step  yields (token, guided log-probs), one engine step per token
    stream_generate  adds text (UTF-8 safe), stop rules and timing; yields `Chunk`s
    generate  joins a stream into a `Result`

Contract: the same request (prompt ids, sampling settings, seed) on the same engine gives the
same tokens. Stops: an end-of-generation token of the base (kept in `tokens`, not in `text`), a
stop string (cut from `text`), `max_tokens`, or a full context (finish_reason "context_full").
"""

from __future__ import annotations

import codecs
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from .engine import Engine, Sequence
from .errors import ContextFullError, UserError
from .sampling import Sampler, SamplingSettings, make_sampler
from .templates import build_messages, render_chat


@dataclass(frozen=True)
class Request:
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Chunk:
    text: str                  # text that is now final ("" while a stop string may be starting)
    token: int | None          # the token just generated (None on a closing chunk)
    finish_reason: str | None  # None, "stop", "stop_string", "length" or "context_full"


@dataclass
class Result:
    text: str
    tokens: list[int]
    prompt_ids: list[int]
    finish_reason: str
    prefill_seconds: float
    decode_seconds: float
    seed: int
    alphas: dict[str, float]
    prefilled_tokens: int = 0  # prompt tokens decoded; the rest were already in the KV caches

    @property
    def tokens_per_second(self) -> float:
        """Tokens after the first over the time since the first (prefill excluded)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(n_tokens=len(self.tokens), prompt_tokens=len(self.prompt_ids),
                    tokens_per_second=round(self.tokens_per_second, 3),
                    prefill_seconds=round(self.prefill_seconds, 6),
                    decode_seconds=round(self.decode_seconds, 6))
        return data


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


def generate_step(engine: Engine, seq: Sequence, prompt_ids: list[int], sampler: Sampler,
                  rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
    """Prefill, then sample and step forever; the caller decides when to stop."""
    logprobs = engine.advance([seq], [engine.reuse_prefix(seq, prompt_ids)])
    while True:
        token = sampler(logprobs, rng)
        yield token, logprobs
        logprobs = engine.advance([seq], [[token]])


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports where one completes."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for k in range(min(len(self.pending), max((len(s) for s in self.stops), default=1) - 1),
                       0, -1):
            if any(s.startswith(self.pending[-k:]) for s in self.stops):
                hold = k
                break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One sequence's tokens to final text: UTF-8 across tokens, stop strings held back and cut,
    and the finish rules (end of generation, stop string, max tokens)."""

    def __init__(self, engine: Engine, request: Request):
        self.model, self.max_tokens = engine.model, request.max_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(request.stop)
        self.n = 0

    def push(self, token: int) -> tuple[str, str | None]:
        """(text now final, finish reason or None) after one more token."""
        self.n += 1
        if self.model.is_eog(token):
            return self.close(), "stop"
        text, stopped = self.stops.feed(self.decoder.decode(self.model.token_bytes(token)))
        if stopped:
            return text, "stop_string"
        if self.n >= self.max_tokens:
            return text + self.stops.feed(self.decoder.decode(b"", final=True))[0] + \
                self.stops.flush(), "length"
        return text, None

    def close(self) -> str:
        """What is still held back, when the sequence ends early."""
        return self.stops.flush() + self.decoder.decode(b"", final=True)


def stream_generate(engine: Engine, prompt_ids: list[int], request: Request,
                    seq: Sequence | None = None) -> Iterator[Chunk]:
    """Yield text as it becomes final; the last chunk carries the finish reason."""
    if len(prompt_ids) >= engine.n_ctx:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens but the context holds "
                        f"{engine.n_ctx}; shorten the prompt or raise --ctx-size")
    if request.max_tokens <= 0:
        return
    seq = seq if seq is not None else engine.new_sequence()
    text = TextStream(engine, request)
    rng = np.random.default_rng(request.seed)
    steps = generate_step(engine, seq, prompt_ids, make_sampler(request.sampling), rng)
    try:
        for token, _ in steps:
            piece, finish = text.push(token)
            yield Chunk(piece, token, finish)
            if finish:
                return
    except ContextFullError:
        yield Chunk(text.close(), None, "context_full")


def generate(engine: Engine, prompt_ids: list[int], request: Request, on_text=None,
             seq: Sequence | None = None, should_stop=None) -> Result:
    """Run a stream to its end; `on_text(str)` sees each piece of text as it becomes final.

    With `seq`, the prompt's prefix already in that sequence's caches is reused. When
    `should_stop()` turns true the stream ends after the current token ("interrupted").
    """
    seq = seq if seq is not None else engine.new_sequence()
    prefilled = len(prompt_ids) - engine.cached_prefix(seq, prompt_ids)
    t0 = time.perf_counter()
    t_first = t_last = t0
    texts: list[str] = []
    tokens: list[int] = []
    finish = "length"
    for chunk in stream_generate(engine, prompt_ids, request, seq):
        t_last = time.perf_counter()
        if chunk.token is not None:
            if not tokens:
                t_first = t_last
            tokens.append(chunk.token)
        if chunk.text:
            texts.append(chunk.text)
            if on_text is not None:
                on_text(chunk.text)
        if chunk.finish_reason:
            finish = chunk.finish_reason
        elif should_stop is not None and should_stop():
            finish = "interrupted"
            break
    return Result(text="".join(texts), tokens=tokens, prompt_ids=list(prompt_ids),
                  finish_reason=finish, prefill_seconds=(t_first - t0) if tokens else 0.0,
                  decode_seconds=t_last - t_first, seed=request.seed,
                  alphas={a.name: a.alpha for a in engine.arms}, prefilled_tokens=prefilled)

"""The request scheduler: requests in, events out, one llama.cpp batch per context per step.

Contract:
- `Scheduler(engine)` takes sequences from the engine's id pool and gives them back (all of
  them at `close()`, so that another scheduler can use the engine after it). `submit`
  checks a `Request` at once (an unknown ARM name, a bad value, a prompt that leaves no room in
  the context raise `UserError`) and returns a `Handle`; `cancel(handle)` ends a request, its
  sequences freed at the start of the next step. Both are safe from other threads while one
  thread calls `step()`.
- `step()` admits waiting requests (first come, first served) while the engine has sequence
  ids free (or idle ones to give up) and KV cells to spare, then
  decodes every live sequence's new tokens in one batch per context: each row with its own
  request's ARM weights (an ARM context decodes only the rows that use it), sampled with its
  own request's sampler and random generator, after its penalties on repetition (over that
  answer's own tokens; log-probs are reported before them). It returns that step's `Event`s:
  one per new token, the last of each answer with its finish reason and `Usage`.
- Shared prefixes: a prompt that starts with tokens another sequence holds (a live one, or a
  finished one kept while its id is idle) copies them instead of decoding them again.
- `n > 1` answers decode the prompt once, then fork; answer j samples with seed + j, so it is
  the answer that the same request alone with seed + j gives.
- Methods (`Request.method`): "genarm" guides with the ARMs. With the engine's reward model,
  "pargs" and "args" score the base's top `candidates` tokens (log-probs, or raw logits) plus
  `reward_weight` x the reward of prefix + token, every such request's candidates in one decode
  of the reward model, and sample from that row; "best-of-n" samples `samples` whole answers
  from the base (answer j with seed + j), scores them once they have all ended, and emits only
  the best one's events, as answer 0. These methods run the base without ARMs.
- `ignore_eos` masks the end-of-generation ids out of a request's rows (before any method
  picks its candidates), so that its answers run to `max_tokens` unless a stop string ends them.
- Errors belong to one request: an answer that outgrows the context ends with finish reason
  "context_full" and the others go on; a failure inside llama.cpp raises `EngineError` (not a
  `UserError`), for a server to tell a 500 from a 400.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Mapping

import numpy as np

from . import guidance, penalties, reward
from .engine import Engine, Sequence
from .errors import ContextFullError, UserError
from .text import TextStream
from .sampling import SamplingSettings, make_sampler

MAX_TOP_LOGPROBS = 20
# GenARM guides with the ARMs' log-probs; the tokenwise methods score the base's top
# candidates with the reward model (PARGS adds w * r to log-probs, ARGS to raw logits);
# best-of-n samples whole answers from the base and returns the one the reward model prefers
METHODS = ("genarm", "pargs", "args", "best-of-n")
TOKENWISE = ("pargs", "args")


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    arms: Mapping[str, float] = field(default_factory=dict)  # weights by name; others: default
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k others'
    method: str = "genarm"       # or, with the reward model: pargs, args, best-of-n
    candidates: int | None = None  # pargs, args: the base's top k the reward model scores (None:
                                   # as many as the engine's reward model was loaded for)
    reward_weight: float = 1.0   # pargs, args: w in score + w * r
    samples: int = 4             # best-of-n: whole answers sampled; the best one is returned
    ignore_eos: bool = False     # end-of-generation ids never drawn: the answer runs to
                                 # max_tokens (or a stop string), as a fixed-length benchmark wants


@dataclass
class Usage:
    """One answer's record, with OpenAI's names where OpenAI has one."""
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0             # prompt tokens copied from another sequence's cache
    time_to_first_token: float = 0.0   # seconds from submit to the first token
    tokens_per_second: float = 0.0     # tokens after the first over the time since the first
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float                            # under the guided distribution, normalised
    top: tuple[tuple[int, float], ...] = ()   # the most likely tokens and theirs


@dataclass
class Event:
    handle: "Handle"
    index: int                 # which of the request's n answers
    token: int | None          # None on a closing event without a token
    text: str                  # text that became final with this token
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None
    usage: Usage | None = None  # on the answer's last event


class Handle:
    """A submitted request: what the caller holds to read its events or cancel it."""

    def __init__(self, request: Request, weights: np.ndarray, submitted: float):
        self.request, self.weights, self.submitted = request, weights, submitted
        self.best_of = request.method == "best-of-n"
        self.n = request.samples if self.best_of else request.n  # answers generated
        self.finished = 0  # answers that have ended
        self.sequences: dict[int, Sequence] = {}  # answer index -> the sequence it ran on
        # best-of-n: each answer's events, held until all are judged, and their rewards
        self.held: dict[int, list[Event]] = {}
        self.rewards: dict[int, float] = {}
        self.to_judge: list[tuple[int, Sequence]] = []

    @property
    def done(self) -> bool:
        return self.finished >= self.n


@dataclass
class _Slot:
    """One answer being generated: its sequence, sampler state and text so far."""
    handle: Handle
    index: int
    seq: Sequence
    pending: list[int]
    text: TextStream
    rng: np.random.Generator
    usage: Usage
    forks: list[Sequence] = field(default_factory=list)  # ids held for n > 1, filled after prefill
    tokens: list[int] = field(default_factory=list)
    t_first: float = 0.0


class Scheduler:
    def __init__(self, engine: Engine, share_prefixes: bool = True):
        self.engine = engine
        self.share_prefixes = share_prefixes
        self._lock = threading.Lock()
        self._waiting: deque[Handle] = deque()
        self._cancelled: dict[Handle, str] = {}  # handle -> finish reason
        self._slots: list[_Slot] = []
        self._idle: OrderedDict[int, Sequence] = OrderedDict()  # finished, cache kept
        self._samplers: dict[SamplingSettings, object] = {}
        self._judging: list[Handle] = []  # best-of-n requests with answers to score

    # -- from any thread --------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        engine = self.engine
        weights = engine.weights(dict(request.arms))
        if not request.prompt_ids:
            raise UserError("the prompt is empty")
        if len(request.prompt_ids) >= engine.n_ctx:
            raise ContextFullError(f"the prompt is {len(request.prompt_ids)} tokens but the "
                                   f"context holds {engine.n_ctx}; shorten the prompt or raise "
                                   "--ctx-size")
        if not 1 <= request.n <= engine.n_seq_max:
            raise UserError(f"n must be between 1 and {engine.n_seq_max} (the parallel "
                            f"sequences), got {request.n}")
        answers = request.samples if request.method == "best-of-n" else request.n
        if _cells(request, engine.n_ctx, answers) > engine.base.n_cells:
            each = _cells(request, engine.n_ctx, 1)
            raise UserError(f"{answers} answers of up to {each} tokens need more KV cells than "
                            f"the cache holds ({engine.base.n_cells}); lower max_tokens or n, or "
                            "raise --kv-size")
        if request.max_tokens < 0:
            raise UserError(f"max_tokens must be >= 0, got {request.max_tokens}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got "
                            f"{request.logprobs}")
        try:
            request.sampling.validate()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if request.method != "genarm":
            _check_tokenwise(request, engine)
            weights = np.zeros_like(weights)  # the tokenwise methods guide the base alone
        handle = Handle(request, weights, time.perf_counter())
        with self._lock:
            self._waiting.append(handle)
        return handle

    def cancel(self, handle: Handle, interrupt: bool = False) -> None:
        """End a request at the next step: its sequences are freed ("cancelled"), or with
        `interrupt` kept with what they hold for a later prompt ("interrupted")."""
        with self._lock:
            self._cancelled[handle] = "interrupted" if interrupt else "cancelled"

    def forget(self) -> None:
        """Free the sequences kept for their prefixes (from the stepping thread)."""
        while self._idle:
            self.engine.release(self._idle.popitem()[1])

    def close(self) -> None:
        """Give every sequence back to the engine, live ones too (from the stepping thread):
        the engine may then serve another scheduler."""
        for slot in list(self._slots):
            self._finish(slot, "cancelled", [], keep=False)
        with self._lock:
            for handle in self._waiting:
                handle.finished = handle.n
            self._waiting.clear()
        self.forget()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet started."""
        with self._lock:
            return len(self._waiting)

    @property
    def cells_in_use(self) -> int:
        """KV cells that live and idle sequences hold (read it from the stepping thread)."""
        return sum(len(s.seq.tokens) for s in self._slots) + \
            sum(len(seq.tokens) for seq in self._idle.values())

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._slots or self._waiting)

    # -- the stepping thread ------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        self._admit(events)
        for slot in [s for s in self._slots if len(s.seq.tokens) + len(s.pending) >
                     self.engine.n_ctx]:
            self._finish(slot, "context_full", events)
        if self._slots:
            self._decode(events)
        if self._judging:
            self._judge(events)
        return events

    def _decode(self, events: list[Event]) -> None:
        """One decode of every live answer's new tokens, then its next token sampled."""
        slots = list(self._slots)
        weights = np.stack([s.handle.weights for s in slots])
        rows = self.engine.step([s.seq for s in slots], [s.pending for s in slots], weights)
        ignoring = [i for i, s in enumerate(slots) if s.handle.request.ignore_eos]
        if ignoring:
            eog = self.engine.model.eog_tokens
            rows = np.array(rows)
            rows[np.ix_(ignoring, eog[eog < rows.shape[1]])] = -np.inf
        tokenwise = [i for i, s in enumerate(slots) if s.handle.request.method in TOKENWISE]
        if tokenwise:
            rows = self._tokenwise([slots[i] for i in tokenwise], rows, tokenwise)
        now = time.perf_counter()
        for slot, row in zip(slots, rows):
            for child in self._fork(slot):
                self._sample(child, row, now, events)
            self._sample(slot, row, now, events)

    def _judge(self, events: list[Event]) -> None:
        """Score best-of-n answers that ended (all of this step's in one decode); once all of a
        request's have, its best answer's events go out as answer 0."""
        handles, self._judging = self._judging, []
        # a handle is queued with its first answer to judge: there is always one
        rewards = iter(self.engine.reward.sequence_rewards(
            [seq for h in handles for _, seq in h.to_judge]))
        for h in handles:
            h.rewards.update((index, float(next(rewards))) for index, _ in h.to_judge)
            h.to_judge = []
            if h.done and h.rewards:
                best = max(sorted(h.rewards), key=lambda i: h.rewards[i])  # ties: the first
                for event in h.held.get(best, []):
                    event.index = 0
                    events.append(event)
                h.held.clear()
                h.sequences = {0: h.sequences[best]}  # a conversation goes on from the best

    def _tokenwise(self, slots: list[_Slot], rows: np.ndarray, at: list[int]) -> np.ndarray:
        """Rows of PARGS/ARGS slots become -inf but at the base's top candidates, which get
        score + w * r, the reward model scoring every slot's candidates in one decode."""
        scores = [guidance.log_softmax(rows[i]) if s.handle.request.method == "pargs" else rows[i]
                  for s, i in zip(slots, at)]
        k = self.engine.reward.k
        candidates = [reward.top_candidates(x, s.handle.request.candidates or k)
                      for s, x in zip(slots, scores)]
        rewards = self.engine.reward.candidates([s.seq for s in slots], candidates)
        out = np.array(rows)
        for s, i, x, c, r in zip(slots, at, scores, candidates, rewards):
            out[i] = reward.tokenwise_scores(x, c, r, s.handle.request.reward_weight)
        return out

    def run(self, handles: Iterable[Handle] = ()) -> Iterator[Event]:
        """Step until every given handle (every request, if none given) is done."""
        handles = list(handles)
        while (not all(h.done for h in handles)) if handles else self.busy:
            yield from self.step()

    # -- admission, forks, finishing ----------------------------------------------------------
    def _drop_cancelled(self, events: list[Event]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, {}
            for handle in cancelled:
                if handle in self._waiting:
                    self._waiting.remove(handle)
                    handle.finished = handle.n
        for slot in [s for s in self._slots if s.handle in cancelled]:
            reason = cancelled[slot.handle]
            self._finish(slot, reason, events, keep=reason == "interrupted")
        for handle in cancelled:  # answers not forked yet end with their first
            handle.finished = handle.n

    def _admit(self, events: list[Event]) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting[0]
                if handle.n > self.engine.free_sequences + len(self._idle):
                    return
                donor, shared = self._best_prefix(list(handle.request.prompt_ids))
                if donor is not None and donor.behind(self.engine.base) < shared:
                    return  # its prefix is being decoded this step: copy it next step
                if not self._make_room(_cells(handle.request, self.engine.n_ctx, handle.n),
                                       donor):
                    return  # the KV cells live answers may still need are spoken for
                self._waiting.popleft()
            self._start(handle, donor, shared, events)

    def _make_room(self, cells: int, keep: Sequence | None) -> bool:
        """Whether `cells` more fit beside what live answers may grow to, giving up idle
        sequences' caches (least recently finished first) to make them fit."""
        n_ctx, total = self.engine.n_ctx, self.engine.base.n_cells
        live = sum(_cells(s.handle.request, n_ctx, 1 + len(s.forks)) for s in self._slots)

        def fits() -> bool:  # the donor's cells become the new answer's: counted in `cells`
            idle = sum(len(q.tokens) for q in self._idle.values() if q is not keep)
            return live + cells + idle <= total

        for seq_id in list(self._idle):
            if fits():
                break
            if self._idle[seq_id] is not keep:
                self.engine.release(self._idle.pop(seq_id))
        return fits()

    def _start(self, handle: Handle, donor: Sequence | None, shared: int,
               events: list[Event]) -> None:
        request = handle.request
        prompt = list(request.prompt_ids)
        if donor is not None and donor.seq_id in self._idle:
            seq = self._idle.pop(donor.seq_id)   # take the idle sequence over: no copy
            self.engine.truncate(seq, shared)
        else:
            seq = self._acquire()
            if donor is not None:
                self.engine.copy_prefix(donor, seq, shared)
        forks = [self._acquire() for _ in range(handle.n - 1)]
        usage = Usage(prompt_tokens=len(prompt), cached_tokens=shared)
        slot = _Slot(handle, 0, seq, prompt[shared:], TextStream(self.engine, request),
                     np.random.default_rng(request.seed), usage, forks)
        answers = [slot] + (self._children(slot) if request.max_tokens == 0 else [])
        self._slots.extend(answers)
        for answer in answers if request.max_tokens == 0 else []:
            self._finish(answer, "length", events)

    def _best_prefix(self, prompt: list[int]) -> tuple[Sequence | None, int]:
        """The sequence whose tokens (a live one's: with those it is about to decode) start
        like prompt for longest; one prompt token is always left to feed."""
        best, best_n = None, 0
        if not self.share_prefixes:
            return best, best_n
        candidates = [(s.seq, s.seq.tokens + s.pending) for s in self._slots] + \
            [(seq, seq.tokens) for seq in self._idle.values()]
        for seq, tokens in candidates:
            n = _common_prefix(tokens, prompt, len(prompt) - 1)
            if n > best_n:
                best, best_n = seq, n
        return best, best_n

    def _acquire(self) -> Sequence:
        if not self.engine.free_sequences:  # the least recently finished idle one gives way
            self.engine.release(self._idle.popitem(last=False)[1])
        return self.engine.new_sequence()

    def _children(self, slot: _Slot) -> list[_Slot]:
        """Slots for answers 1..n-1, on the sequences held for them."""
        request, children = slot.handle.request, []
        for j, seq in enumerate(slot.forks, start=1):
            children.append(_Slot(slot.handle, j, seq, [], TextStream(self.engine, request),
                                  np.random.default_rng(request.seed + j),
                                  Usage(slot.usage.prompt_tokens, 0, slot.usage.cached_tokens)))
        slot.forks = []
        return children

    def _fork(self, slot: _Slot) -> list[_Slot]:
        """After the prompt's one decode, answers 1..n-1 take a copy of its cache."""
        if not slot.forks:
            return []
        self.engine.fork(slot.seq, slot.forks)
        children = self._children(slot)
        self._slots.extend(children)
        return children

    def _sample(self, slot: _Slot, row: np.ndarray, now: float, events: list[Event]) -> None:
        request = slot.handle.request
        sampler = self._samplers.get(request.sampling)
        if sampler is None:
            sampler = self._samplers[request.sampling] = make_sampler(request.sampling)
        scored = penalties.penalize(row, slot.tokens, request.sampling,
                                    self._breakers(request.sampling))  # row itself when off
        token = sampler(scored, slot.rng)
        if not slot.tokens:
            slot.t_first = now
            slot.usage.time_to_first_token = round(now - slot.handle.submitted, 6)
        slot.tokens.append(token)
        slot.pending = [token]
        logprob = _logprob(row, token, request.logprobs) if request.logprobs is not None \
            else None
        piece, finish = slot.text.push(token)
        event = Event(slot.handle, slot.index, token, piece, logprob=logprob)
        _emit(slot.handle, event, events)
        if finish:
            self._finish(slot, finish, events, event=event)

    def _breakers(self, sampling: SamplingSettings) -> penalties.Breakers | None:
        """DRY's sequence breakers, processed as llama.cpp does (the model keeps them)."""
        if not sampling.dry_multiplier or not sampling.dry_sequence_breakers:
            return None
        return self.engine.model.dry_breakers(sampling.dry_sequence_breakers)

    def _finish(self, slot: _Slot, reason: str, events: list[Event], keep: bool = True,
                event: Event | None = None) -> None:
        """End an answer: its last event gets the reason and usage; its sequence goes idle
        (cache kept for a later prompt that starts the same way) or, cancelled, free."""
        if event is None:
            event = Event(slot.handle, slot.index, None, slot.text.close())
            _emit(slot.handle, event, events)
        usage = slot.usage
        usage.completion_tokens = len(slot.tokens)
        steps, elapsed = len(slot.tokens) - 1, time.perf_counter() - slot.t_first
        usage.tokens_per_second = round(steps / elapsed, 3) if steps > 0 and elapsed > 0 else 0.0
        usage.finish_reason = event.finish_reason = reason
        event.usage = usage
        self._slots.remove(slot)
        slot.handle.finished += 1
        slot.handle.sequences[slot.index] = slot.seq
        if slot.handle.best_of:
            self._to_judge(slot, reason, event, events)
        for seq in [slot.seq] + slot.forks:
            if keep and seq is slot.seq and seq.tokens:
                self._idle[seq.seq_id] = seq
            else:
                self.engine.release(seq)
        slot.forks = []


    def _to_judge(self, slot: _Slot, reason: str, event: Event, events: list[Event]) -> None:
        """A best-of-n answer that ended waits, whole, for the reward model; a cancelled one
        ends the request's stream (answer 0's closing event)."""
        handle = slot.handle
        if reason in ("cancelled", "interrupted"):
            handle.held.clear()
            if slot.index == 0:
                events.append(event)
            return
        slot.seq.tokens.extend(slot.pending)  # the last token, never decoded by the base
        slot.pending = []
        handle.to_judge.append((slot.index, slot.seq))
        if handle not in self._judging:
            self._judging.append(handle)


def _logprob(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-prob and the top alternatives, over the guided distribution."""
    logprobs = guidance.log_softmax(row)
    best = np.argpartition(-logprobs, top)[:top] if 0 < top < logprobs.size else \
        np.arange(logprobs.size if top else 0)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(int(token), float(logprobs[token]),
                        tuple((int(i), float(logprobs[i])) for i in best))


def _emit(handle: Handle, event: Event, events: list[Event]) -> None:
    """An event goes out now, or, for a best-of-n answer, waits for the judging."""
    if handle.best_of:
        handle.held.setdefault(event.index, []).append(event)
    else:
        events.append(event)


def _check_tokenwise(request: Request, engine: Engine) -> None:
    """What the methods that use the reward model need, checked at submit."""
    if request.method not in METHODS:
        raise UserError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}")
    if engine.reward is None:
        raise UserError(f"--method {request.method} needs a reward model: pass --reward-model "
                        "RM.gguf (or a preset that names one)")
    if request.method == "best-of-n":
        if request.n != 1:
            raise UserError(f"best-of-n returns one answer; ask for n = 1, not {request.n}")
        if not 1 <= request.samples <= engine.n_seq_max:
            raise UserError(f"samples must be between 1 and {engine.n_seq_max} (the parallel "
                            f"sequences), got {request.samples}")
        return
    if request.candidates is not None and not 1 <= request.candidates <= engine.reward.k:
        raise UserError(f"candidates must be between 1 and {engine.reward.k} (the reward model "
                        f"was loaded for {engine.reward.k}), got {request.candidates}")
    if not np.isfinite(request.reward_weight):
        raise UserError(f"the reward weight must be a finite number, not {request.reward_weight}")


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n, limit = 0, min(len(a), len(b), limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _cells(request: Request, n_ctx: int, answers: int | None = None) -> int:
    """The most KV cells `answers` of a request's answers (all n by default) can take, each
    ending at the context size."""
    each = min(n_ctx, len(request.prompt_ids) + request.max_tokens)
    return each * (request.n if answers is None else answers)

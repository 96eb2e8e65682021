"""One decode policy per request: every decision between the engine's rows and a request's
next token and events, built once at submit.

Contract:
- `Request` is what a caller asks for. `Policies(engine).build(request)` checks every option of
  the request against the engine (the one place they are checked; a bad one raises `UserError`
  with one line) and returns the request's `Policy`:
      alphas       the ARM weights of its rows (GenARM), in the engine's ARM order
      processors   row -> row steps, in stage order: the end-of-generation mask (ignore_eos),
                   logit_bias, the grammar's mask (json_schema, grammar, regex, choice: only
                   what the answer's grammar allows), then the method's rerank (PARGS/ARGS: the
                   base's top candidates, allowed ones only, scored with the reward model)
      grammar      the compiled constraint (constraints.Grammar); `constraint()` is a new
                   answer's state, which the scheduler holds with the answer
      next_token   per answer: penalties over the answer's own tokens, then the sampler with
                   the answer's own random generator
      finish       how its events go out: as they come, or held and judged (best-of-n)
- A processor is shared by every request that uses it and is called once per step with all of
  its rows and a `RowView` of each (its answer, and which of the answer's rows it is), so that
  the reward model scores a step's candidates in one decode and the grammar masks a step's rows
  together. Masking comes after the guided combination (the engine's rows) and before the
  sampler's temperature and filters, so that it never changes a component's normaliser. A new method is a new processor or finish hook here, not a branch in the scheduler.
- `Policies.after_step()` runs what waits for a step's end (best-of-n's judging, every
  ended answer of the step in one decode of the reward model) and returns its `Verdict`s.
  Finish hooks read answers (`Ended`, a view) and return the events to send; the scheduler
  does every write to its answers and handles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence as Seq

import numpy as np

from . import constraints, fields, guidance, penalties, reward
from .config import RequestParams
from .errors import ContextFullError, UserError
from .text import STOPPED
from .search import Search, Searches
from .sampling import Sampler, SamplingSettings, make_distribution, make_sampler
from .speculative import Drafting, LookupDrafter, ModelDrafter, new_drafting

if TYPE_CHECKING:
    from .engine import Engine, Sequence

TOKENWISE = ("pargs", "args")
Request = RequestParams  # what a caller asks for: config.py declares every option of it


@dataclass
class Policy:
    """A request's chain, built and checked at submit."""
    request: Request
    alphas: np.ndarray
    processors: tuple  # each with a `stage`: chains run in stage order
    sampler: Sampler
    penalize: Callable[[np.ndarray, list[int]], np.ndarray] | None
    finish: "Emit | BestOfN | Search"
    answers: int   # sequences it generates
    returned: int  # answers its caller gets
    drafter: LookupDrafter | ModelDrafter | None = None
    draft: Drafting | None = None  # a new answer's speculation state: the limit and costs
    grammar: constraints.Grammar | None = None
    _distribution: Callable | None = None

    @property
    def greedy(self) -> bool:
        return self.request.sampling.is_greedy

    def next_token(self, row: np.ndarray, tokens: list[int], rng: np.random.Generator) -> int:
        """An answer's next token: penalties over its own tokens, then the sampler."""
        if self.penalize is not None:
            row = self.penalize(row, tokens)
        return self.sampler(row, rng)

    def distribution(self, row: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """What `next_token` draws from, as (token ids, probabilities)."""
        if self.penalize is not None:
            row = self.penalize(row, tokens)
        return self._distribution(row)

    def drafting(self) -> Drafting | None:
        """A new answer's speculation state (None: it does not draft)."""
        return replace(self.draft) if self.draft is not None else None

    def constraint(self) -> constraints.Constraint | None:
        """A new answer's grammar state (None: unconstrained)."""
        return self.grammar.start() if self.grammar is not None else None


@dataclass(frozen=True)
class RowView:
    """One row of a step: the answer it belongs to (the scheduler's, read only) and which of its
    rows it is: 0 after its pending token, i after its i-th draft token (`draft`)."""
    answer: object
    offset: int
    draft: tuple[int, ...] = ()

    @property
    def seq(self) -> "Sequence":
        return self.answer.seq

    @property
    def request(self) -> Request:
        return self.answer.policy.request


class EogMask:
    """The end-of-generation ids out of a row (before any method picks its candidates), so that
    an answer runs to max_tokens unless a stop string ends it."""
    stage = 0

    def __init__(self, eog: np.ndarray):
        self.eog = eog

    def __call__(self, rows: np.ndarray, views: list[RowView]) -> np.ndarray:
        rows[:, self.eog[self.eog < rows.shape[1]]] = -np.inf
        return rows


class LogitBias:
    """OpenAI's logit_bias: each request's biases added to its rows; -100 bans a token."""
    stage = 1

    def __call__(self, rows: np.ndarray, views: list[RowView]) -> np.ndarray:
        for row, view in zip(rows, views):
            ids, values = _biases(tuple(view.request.logit_bias.items()))
            row[ids] += values
        return rows


@functools.lru_cache(maxsize=256)
def _biases(items: tuple) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([int(k) for k, _ in items], dtype=np.intp)
    values = np.array([-np.inf if v <= -100 else v for _, v in items], dtype=np.float32)
    return ids, values


class GrammarMask:
    """Each answer's grammar: every token it does not allow to -inf, at each of its rows (after
    each draft token too); a step's masks are computed together."""
    stage = 2

    def __call__(self, rows: np.ndarray, views: list[RowView]) -> np.ndarray:
        return constraints.mask(rows, [(v.answer.constraint, i, v.draft)
                                       for i, v in enumerate(views) if v.offset == 0])


class Rerank:
    """PARGS/ARGS: a row becomes -inf but at the base's top candidates, which get score + w * r
    (score: log-prob for PARGS, raw logit for ARGS); every row's candidates in one decode."""
    stage = 3

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def __call__(self, rows: np.ndarray, views: list[RowView]) -> np.ndarray:
        seqs, requests = [v.seq for v in views], [v.request for v in views]
        scores = [guidance.log_softmax(row) if r.method == "pargs" else row
                  for row, r in zip(rows, requests)]
        candidates = [reward.top_candidates(x, r.candidates or self.engine.reward.k)
                      for x, r in zip(scores, requests)]
        rewards = self.engine.candidate_rewards(seqs, candidates)
        return np.stack([reward.tokenwise_scores(x, c, w, r.reward_weight)
                         for x, c, w, r in zip(scores, candidates, rewards, requests)])


@dataclass(frozen=True)
class Ended:
    """What a finish hook reads of an answer that has ended; the hook writes none of it."""
    handle: object  # the request's scheduler.Handle
    index: int      # which of its answers
    reason: str     # the finish reason
    event: object   # its last Event
    seq: "Sequence"  # what it ran on: every token of it when the hook's `whole(reason)`


@dataclass(frozen=True)
class Verdict:
    """A judged request: the answer that wins, and the events that go out for it (copies,
    re-indexed as answer 0)."""
    handle: object
    best: int
    events: list


class Emit:
    """Events go out as they come.

    A finish hook's interface: `emit(event, row, reward)` returns the events to send now (an
    answer's events, in order; `row` is the processed row the token came from and `reward` the
    ARMs' reward row where the hook `wants_rewards`: not None, the base's weight in it);
    `waits(index, finish, seq)` says whether the answer waits, not decoded, for the hook's
    verdict (search: at the end of a segment) instead of going on or ending; `whole(reason)` says whether the hook reads the answer's
    last token in its sequence (the scheduler appends it, never decoded, before `ended` or
    while it waits); `ended(Ended)` returns the events to send when an answer ends."""
    wants_rewards: float | None = None  # the base's weight in the ARMs' reward rows it reads

    def emit(self, event, row: np.ndarray | None = None,
             reward: np.ndarray | None = None) -> list:
        return [event]

    def waits(self, index: int, finish: str | None, seq: "Sequence") -> bool:
        return False

    def whole(self, reason: str | None) -> bool:
        return False

    def ended(self, answer: Ended) -> list:
        return []


class BestOfN(Emit):
    """Each answer's events are held until every answer has ended; the reward model then scores
    them, and only the best one's go out, as answer 0 (a conversation goes on from it)."""

    def __init__(self, judge: "Judge"):
        self.judge = judge
        self.held: dict[int, list] = {}
        self.rewards: dict[int, float] = {}
        self.to_judge: list[tuple[int, "Sequence"]] = []
        self.decoded = 0  # every answer's tokens

    def emit(self, event, row=None, reward=None) -> list:
        self.held.setdefault(event.index, []).append(event)
        return []

    def whole(self, reason: str | None) -> bool:
        return reason not in STOPPED  # the reward model scores the whole answer

    def ended(self, answer: Ended) -> list:
        if answer.reason in STOPPED:  # the stream ends with answer 0's close
            self.held.clear()
            return [answer.event] if answer.index == 0 else []
        self.to_judge.append((answer.index, answer.seq))
        self.decoded += answer.event.usage.completion_tokens
        self.judge.wait(answer.handle)
        return []

    def judged(self, handle, rewards) -> Verdict | None:
        """Once every answer has ended and been scored, the best one's events."""
        self.rewards.update((index, float(r)) for (index, _), r in zip(self.to_judge, rewards))
        self.to_judge = []
        if not (handle.done and self.rewards):
            return None
        best = max(sorted(self.rewards), key=lambda i: self.rewards[i])  # ties: the first
        events = [replace(event, index=0) for event in self.held.get(best, [])]
        events[-1].usage.decoded_tokens = self.decoded
        self.held.clear()
        return Verdict(handle, best, events)


class Judge:
    """Scores the whole answers best-of-n requests wait on, a step's in one decode."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.waiting: list = []  # handles with answers to score

    def wait(self, handle) -> None:
        if handle not in self.waiting:
            self.waiting.append(handle)

    def run(self) -> list[Verdict]:
        handles, self.waiting = self.waiting, []
        if not handles:
            return []
        rewards = iter(self.engine.sequence_rewards(
            [seq for h in handles for _, seq in h.policy.finish.to_judge]))
        verdicts = []
        for h in handles:
            hook = h.policy.finish
            verdicts.append(hook.judged(h, [next(rewards) for _ in hook.to_judge]))
        return [v for v in verdicts if v is not None]


class Policies:
    """Builds each request's policy for one engine, with the processors they share."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.mask = EogMask(engine.model.eog_tokens)
        self.bias, self.grammar_mask = LogitBias(), GrammarMask()
        scores = engine.reward is not None
        self.rerank = Rerank(engine) if scores else None
        self.judge = Judge(engine) if scores else None
        self.searches = Searches(engine)
        self.lookup = LookupDrafter()  # stateless: one for every request
        self._samplers: dict[SamplingSettings, Sampler] = {}

    def build(self, request: Request) -> Policy:
        """The request's policy; its `request` has the engine's defaults filled in (the
        candidates the reward model was loaded for, the draft tokens the contexts hold)."""
        _check(request, self.engine)
        if request.method in TOKENWISE and request.candidates is None:
            request = replace(request, candidates=self.engine.reward.k)
        if request.drafts and request.draft_tokens is None:
            request = replace(request, draft_tokens=self.engine.max_draft)
        method = request.method
        alphas = self.engine.alphas(dict(request.arms))
        if method not in ("genarm", "search"):
            alphas = np.zeros_like(alphas)  # the reward-model methods guide the base alone
        grammar = constraints.compile_request(request, self.engine.model)
        processors = ((self.mask,) if request.ignore_eos else ()) + \
            ((self.bias,) if request.logit_bias else ()) + \
            ((self.grammar_mask,) if grammar is not None else ()) + \
            ((self.rerank,) if method in TOKENWISE else ())
        sampling = request.sampling
        sampler = self._samplers.get(sampling)
        if sampler is None:
            sampler = self._samplers.setdefault(sampling, make_sampler(sampling))
        penalize = None
        if sampling.penalized:  # DRY's sequence breakers, processed as llama.cpp does
            breakers = self.engine.model.dry_breakers(sampling.dry_sequence_breakers) \
                if sampling.dry_multiplier and sampling.dry_sequence_breakers else None
            penalize = functools.partial(penalties.penalize, settings=sampling,
                                         breakers=breakers)  # the row itself when off
        finish = BestOfN(self.judge) if method == "best-of-n" else \
            Search(request, self.searches, float(alphas.sum())) if method == "search" else Emit()
        policy = Policy(request, alphas, processors, sampler, penalize, finish,
                        answers=request.answers, returned=request.n, grammar=grammar)
        if request.drafts:
            policy.drafter = self._drafter(request, alphas)
            policy.draft = new_drafting(self.engine, policy.drafter, alphas, request.draft_tokens)
            policy._distribution = make_distribution(sampling)
        return policy

    def _drafter(self, request: Request, alphas: np.ndarray) -> LookupDrafter | ModelDrafter:
        kind = request.speculative
        if kind == "lookup":
            return self.lookup
        weights = np.zeros(len(alphas), dtype=np.float32)
        if kind == "arm":
            weights[_own_model_arm(self.engine, alphas)] = 1.0
        elif kind == "guided":
            weights[:] = alphas
        return ModelDrafter(kind != "arm", weights)

    def after_step(self) -> list:
        """What waits for a step's end: the requests judged in it (`Verdict`s) and the searches
        whose candidates all wait (`search.Regroup`s)."""
        return (self.judge.run() if self.judge is not None else []) + self.searches.run()


def run_processors(rows: np.ndarray, views: Seq[RowView]) -> np.ndarray:
    """Every row through its answer's policy's processors, each processor once for all its
    rows."""
    groups: dict = {}
    for i, view in enumerate(views):
        for p in view.answer.policy.processors:
            groups.setdefault(p, []).append(i)
    if not groups:
        return rows
    rows = np.array(rows)  # the engine's rows may be views of llama.cpp's buffers
    for p in sorted(groups, key=lambda p: p.stage):
        at = groups[p]
        rows[at] = p(rows[at], [views[i] for i in at])
    return rows


def _check(request: Request, engine: "Engine") -> None:
    """A request's values (`RequestParams.validate`), then what it asks of this engine."""
    request.validate()
    if not request.prompt_ids:
        raise UserError("the prompt is empty")
    if len(request.prompt_ids) >= engine.n_ctx:
        raise ContextFullError(f"the prompt is {len(request.prompt_ids)} tokens but the context "
                               f"holds {engine.n_ctx}; shorten the prompt or raise --ctx-size")
    _at_most("n", request.n, engine.n_seq_max, "(the parallel sequences)")
    for key in request.logit_bias:
        if int(key) >= engine.n_vocab:
            raise UserError(f"logit_bias {key}: no such token; the vocabulary has "
                            f"{engine.n_vocab} (ids 0 to {engine.n_vocab - 1})", "logit_bias")
    if request.method != "genarm":
        _check_method(request, engine)
    if request.drafts:
        _check_speculative(request, engine)
    answers = request.answers
    if request.cells(engine.n_ctx, answers) > engine.base.n_cells:
        raise UserError(f"{answers} answers of up to {request.cells(engine.n_ctx, 1)} tokens need "
                        f"more KV cells than the cache holds ({engine.base.n_cells}); lower "
                        "max_tokens or n, or raise --kv-size")


def _check_speculative(request: Request, engine: "Engine") -> None:
    if engine.max_draft < 1:
        raise UserError("this model was loaded without room for drafts: load it with "
                        "--speculative (or draft_tokens > 0)", "speculative")
    if request.speculative in ("model", "guided") and engine.drafter is None:
        raise UserError(f"the {request.speculative} drafter needs a draft model: load one with "
                        "--draft-model MODEL.gguf (sharing the base's tokenizer)", "speculative")
    if request.speculative == "arm" and \
            _own_model_arm(engine, engine.alphas(dict(request.arms))) is None:
        raise UserError("the arm drafter needs an ARM that is a model of its own (not a LoRA of "
                        "the base) and switched on for this request; use another drafter",
                        "speculative")
    if request.draft_tokens is not None:
        _at_most("draft_tokens", request.draft_tokens, engine.max_draft,
                 "(the most the model was loaded for)")


def _own_model_arm(engine: "Engine", alphas: np.ndarray) -> int | None:
    """The first ARM switched on whose model is not the base's: small enough to draft."""
    return next((i for i, (arm, a) in enumerate(zip(engine.arms, alphas))
                 if a and arm.context.model is not engine.model), None)


def _check_method(request: Request, engine: "Engine") -> None:
    """What the methods that use the reward model, and search, need."""
    if request.needs_reward_model and engine.reward is None:
        what = "--search-score reward" if request.method == "search" else \
            f"--method {request.method}"
        raise UserError(f"{what} needs a reward model: pass --reward-model RM.gguf (or a preset "
                        "that names one)", "search_score" if request.method == "search"
                        else "method")
    if request.method == "search":
        _at_most("search_width", request.search_width,
                 engine.n_seq_max // request.beams,
                 f"(times beams {request.beams}: the parallel sequences)")
        if request.ranks_by_arms and not engine.alphas(dict(request.arms)).any():
            raise UserError(f"--search-score {request.search_score} ranks by the ARMs' reward, "
                            "but no ARM is "
                            "switched on for this request: give an ARM a weight, or rank by "
                            "guided", "search_score")
    elif request.method == "best-of-n":
        _at_most("samples", request.samples, engine.n_seq_max, "(the parallel sequences)")
    elif request.candidates is not None:
        k = engine.reward.k
        _at_most("candidates", request.candidates, k, f"(the reward model was loaded for {k})")


def _at_most(name: str, value: int, high: int, why: str) -> None:
    """A value (already checked against its own range) within what the engine holds."""
    if value > high:
        low = fields.spec_map(RequestParams)[name].option.low
        raise UserError(f"{name} must be between {low} and {high} {why}, got {value}", name)

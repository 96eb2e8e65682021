"""One decode policy per request: every decision between the engine's rows and a request's
next token and events, built once at submit.

Contract:
- `Request` is what a caller asks for. `Policies(engine).build(request)` checks every option of
  the request against the engine (the one place they are checked; a bad one raises `UserError`
  with one line) and returns the request's `Policy`:
      alphas       the ARM weights of its rows (GenARM), in the engine's ARM order
      processors   row -> row steps, in stage order: the end-of-generation mask (ignore_eos),
                   then the method's rerank (PARGS/ARGS: the base's top candidates scored with
                   the reward model)
      next_token   per answer: penalties over the answer's own tokens, then the sampler with
                   the answer's own random generator
      finish       how its events go out: as they come, or held and judged (best-of-n)
- A processor is shared by every request that uses it and is called once per step with all of
  its rows (`rows, seqs, requests`), so that the reward model scores a step's candidates in one
  decode. A new method is a new processor or finish hook here, not a branch in the scheduler.
- `Policies.after_step()` runs what waits for a step's end (best-of-n's judging, every
  ended answer of the step in one decode of the reward model) and returns its `Verdict`s.
  Finish hooks read answers (`Ended`, a view) and return the events to send; the scheduler
  does every write to its answers and handles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence as Seq

import numpy as np

from . import guidance, penalties, reward
from .errors import ContextFullError, UserError
from .sampling import Sampler, SamplingSettings, SettingError, make_distribution, make_sampler
from .speculative import DRAFTERS, Drafting, LookupDrafter, ModelDrafter, new_drafting

if TYPE_CHECKING:
    from .engine import Engine, Sequence

MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
# GenARM guides with the ARMs' log-probs; the tokenwise methods score the base's top
# candidates with the reward model (PARGS adds w * r to log-probs, ARGS to raw logits);
# best-of-n samples whole answers from the base and returns the one the reward model prefers
METHODS = ("genarm", "pargs", "args", "best-of-n")
TOKENWISE = ("pargs", "args")
STOPPED = ("cancelled", "interrupted")  # finish reasons of answers stopped from outside


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    arms: Mapping[str, float] = field(default_factory=dict)  # alphas by ARM name; others: the
                                                             # ARM's own
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k others'
    method: str = "genarm"       # or, with the reward model: pargs, args, best-of-n
    candidates: int | None = None  # pargs, args: the base's top k the reward model scores (None:
                                   # as many as the engine's reward model was loaded for)
    reward_weight: float = 1.0   # pargs, args: w in score + w * r
    samples: int = 4             # best-of-n: whole answers sampled; the best one is returned
    ignore_eos: bool = False     # end-of-generation ids never drawn: the answer runs to
                                 # max_tokens (or a stop string), as a fixed-length benchmark wants
    speculative: str | None = None  # a drafter (lookup, model, guided, arm): drafts verified
                                    # in one decode (exact); None: off
    draft_tokens: int | None = None  # the most draft tokens per verify (None: the engine's most)

    @property
    def drafts(self) -> bool:
        """Whether its answers draft (speculative decoding is on)."""
        return self.speculative not in (None, "off")

    def cells(self, n_ctx: int, answers: int) -> int:
        """The most KV cells `answers` of its answers can take, each ending at n_ctx."""
        return min(n_ctx, len(self.prompt_ids) + self.max_tokens) * answers


@dataclass
class Policy:
    """A request's chain, built and checked at submit."""
    request: Request
    alphas: np.ndarray
    processors: tuple  # each with a `stage`: chains run in stage order
    sampler: Sampler
    penalize: Callable[[np.ndarray, list[int]], np.ndarray] | None
    finish: "Emit | BestOfN"
    answers: int   # sequences it generates
    returned: int  # answers its caller gets
    drafter: LookupDrafter | ModelDrafter | None = None
    draft: Drafting | None = None  # a new answer's speculation state: the limit and costs
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


class EogMask:
    """The end-of-generation ids out of a row (before any method picks its candidates), so that
    an answer runs to max_tokens unless a stop string ends it."""
    stage = 0

    def __init__(self, eog: np.ndarray):
        self.eog = eog

    def __call__(self, rows: np.ndarray, seqs: list, requests: list) -> np.ndarray:
        rows[:, self.eog[self.eog < rows.shape[1]]] = -np.inf
        return rows


class Rerank:
    """PARGS/ARGS: a row becomes -inf but at the base's top candidates, which get score + w * r
    (score: log-prob for PARGS, raw logit for ARGS); every row's candidates in one decode."""
    stage = 1

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def __call__(self, rows: np.ndarray, seqs: list, requests: list) -> np.ndarray:
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

    A finish hook's interface: `emit(event)` returns the events to send now (an answer's
    events, in order); `whole(reason)` says whether the hook reads the answer's last token in
    its sequence (the scheduler appends it, never decoded, before `ended`); `ended(Ended)`
    returns the events to send when an answer ends."""

    def emit(self, event) -> list:
        return [event]

    def whole(self, reason: str) -> bool:
        return False

    def ended(self, answer: Ended) -> list:
        return []


class BestOfN:
    """Each answer's events are held until every answer has ended; the reward model then scores
    them, and only the best one's go out, as answer 0 (a conversation goes on from it)."""

    def __init__(self, judge: "Judge"):
        self.judge = judge
        self.held: dict[int, list] = {}
        self.rewards: dict[int, float] = {}
        self.to_judge: list[tuple[int, "Sequence"]] = []

    def emit(self, event) -> list:
        self.held.setdefault(event.index, []).append(event)
        return []

    def whole(self, reason: str) -> bool:
        return reason not in STOPPED  # the reward model scores the whole answer

    def ended(self, answer: Ended) -> list:
        if answer.reason in STOPPED:  # the stream ends with answer 0's close
            self.held.clear()
            return [answer.event] if answer.index == 0 else []
        self.to_judge.append((answer.index, answer.seq))
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
        scores = engine.reward is not None
        self.rerank = Rerank(engine) if scores else None
        self.judge = Judge(engine) if scores else None
        self.lookup = LookupDrafter()  # stateless: one for every request
        self._samplers: dict[SamplingSettings, Sampler] = {}

    def build(self, request: Request) -> Policy:
        _check(request, self.engine)
        method = request.method
        alphas = self.engine.alphas(dict(request.arms))
        if method != "genarm":
            alphas = np.zeros_like(alphas)  # the reward-model methods guide the base alone
        processors = ((self.mask,) if request.ignore_eos else ()) + \
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
        best_of = method == "best-of-n"
        policy = Policy(request, alphas, processors, sampler, penalize,
                        BestOfN(self.judge) if best_of else Emit(),
                        answers=request.samples if best_of else request.n,
                        returned=1 if best_of else request.n)
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

    def after_step(self) -> list[Verdict]:
        """What waits for a step's end: the requests judged in it."""
        return self.judge.run() if self.judge is not None else []


def run_processors(rows: np.ndarray, seqs: Seq, policies: Seq[Policy]) -> np.ndarray:
    """Every row through its policy's processors, each processor once for all its rows."""
    groups: dict = {}
    for i, policy in enumerate(policies):
        for p in policy.processors:
            groups.setdefault(p, []).append(i)
    if not groups:
        return rows
    rows = np.array(rows)  # the engine's rows may be views of llama.cpp's buffers
    for p in sorted(groups, key=lambda p: p.stage):
        at = groups[p]
        rows[at] = p(rows[at], [seqs[i] for i in at], [policies[i].request for i in at])
    return rows


def _check(request: Request, engine: "Engine") -> None:
    """Every option of a request, against what the engine holds."""
    if not request.prompt_ids:
        raise UserError("the prompt is empty")
    if len(request.prompt_ids) >= engine.n_ctx:
        raise ContextFullError(f"the prompt is {len(request.prompt_ids)} tokens but the context "
                               f"holds {engine.n_ctx}; shorten the prompt or raise --ctx-size")
    _integer("max_tokens", request.max_tokens, 0, None,
             f"max_tokens must be >= 0, got {request.max_tokens}")
    _integer("n", request.n, 1, engine.n_seq_max, f"n must be between 1 and "
             f"{engine.n_seq_max} (the parallel sequences), got {request.n}")
    _integer("seed", request.seed, 0, MAX_SEED,
             f"seed must be between 0 and {MAX_SEED}, got {request.seed}")
    if request.logprobs is not None:
        _integer("logprobs", request.logprobs, 0, MAX_TOP_LOGPROBS, f"top logprobs must be "
                 f"between 0 and {MAX_TOP_LOGPROBS}, got {request.logprobs}")
    try:
        request.sampling.validate()
    except SettingError as exc:
        raise UserError(str(exc), exc.field) from None
    if request.method != "genarm":
        _check_method(request, engine)
    if request.drafts:
        _check_speculative(request, engine)
    answers = request.samples if request.method == "best-of-n" else request.n
    if request.cells(engine.n_ctx, answers) > engine.base.n_cells:
        raise UserError(f"{answers} answers of up to {request.cells(engine.n_ctx, 1)} tokens need "
                        f"more KV cells than the cache holds ({engine.base.n_cells}); lower "
                        "max_tokens or n, or raise --kv-size")


def _check_speculative(request: Request, engine: "Engine") -> None:
    if request.speculative not in DRAFTERS:
        raise UserError(f"unknown drafter {request.speculative!r}; choose one of off, "
                        f"{', '.join(DRAFTERS)}", "speculative")
    if request.method != "genarm":
        raise UserError(f"speculative decoding verifies GenARM's guided target; --method "
                        f"{request.method} scores each token with the reward model: drop one",
                        "speculative")
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
        _integer("draft_tokens", request.draft_tokens, 1, engine.max_draft, f"draft_tokens "
                 f"must be between 1 and {engine.max_draft} (the most the model was loaded "
                 f"for), got {request.draft_tokens}")


def _own_model_arm(engine: "Engine", alphas: np.ndarray) -> int | None:
    """The first ARM switched on whose model is not the base's: small enough to draft."""
    return next((i for i, (arm, a) in enumerate(zip(engine.arms, alphas))
                 if a and arm.context.model is not engine.model), None)


def _check_method(request: Request, engine: "Engine") -> None:
    """What the methods that use the reward model need."""
    if request.method not in METHODS:
        raise UserError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}",
                        "method")
    if engine.reward is None:
        raise UserError(f"--method {request.method} needs a reward model: pass --reward-model "
                        "RM.gguf (or a preset that names one)", "method")
    if request.method == "best-of-n":
        if request.n != 1:
            raise UserError(f"best-of-n returns one answer; ask for n = 1, not {request.n}", "n")
        _integer("samples", request.samples, 1, engine.n_seq_max, f"samples must be between 1 "
                 f"and {engine.n_seq_max} (the parallel sequences), got {request.samples}")
        return
    k = engine.reward.k
    if request.candidates is not None:
        _integer("candidates", request.candidates, 1, k, f"candidates must be between 1 and {k} "
                 f"(the reward model was loaded for {k}), got {request.candidates}")
    if not np.isfinite(request.reward_weight):
        raise UserError(f"the reward weight must be a finite number, not {request.reward_weight}",
                        "reward_weight")


def _integer(name: str, value, low: int, high: int | None, message: str) -> None:
    """A whole number in [low, high] (no upper bound with None), or a UserError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        raise UserError(message, name)

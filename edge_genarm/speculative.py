"""Exact speculative decoding against a guided target: the drafters, the acceptance rule and
the proposer that the scheduler asks what to feed each answer and what it keeps.

Contract:
- `Proposer(engine)` is the scheduler's one interface to drafting. `propose(answers)` returns
  each answer's `Proposal` for a step: the tokens to feed (its pending token, then its draft)
  and how many rows to read back (1 + its draft's length); an answer that does not draft (its
  policy has no drafter, its first step, no room left) is fed its pending token alone. Model
  drafters draft here, one token of every such answer per round through
  `Engine.draft_step`. `keep(answer, proposal, rows)` returns the answer's next tokens from
  its rows (one drawn by its policy, or the draft tokens `accept` keeps and the token after
  them) and truncates the rejected positions from every context. Only the answer's own
  `Drafting` is written; the answer is the scheduler's and is only read.
- A drafter proposes the next tokens of an answer from its tokens so far. `LookupDrafter`
  (prompt lookup) costs no model: it finds the latest earlier occurrence of the context's last
  n tokens (n from `max_ngram` down to `min_ngram`, 16 to 4) and proposes at most n of the
  tokens that followed it (a longer match is likelier to go on; on a CPU each verified position
  costs a good part of a step, so short, spurious matches must not draft); where nothing
  matches it proposes nothing, so a row that drafts nothing decodes as usual.
- `Drafting` is one answer's state: how many tokens to draft next and the counts its usage
  reports (drafted, accepted). The length is the one with the most tokens per unit of cost,
  from the answer's measured acceptance, what a verify of k + 1 positions costs and a model
  drafter's own steps.
- `ModelDrafter` drafts with models, one token per decode: its row is the draft model's
  logits (`draft_model`) plus each ARM's log-probs times its weight (`weights`), put through
  the request's own penalties and sampler. The kinds in `config.DRAFTERS`: "model" (the draft model
  alone), "guided" (the draft model guided by the request's ARMs) and "arm" (an ARM that is a
  small model of its own, alone). An ARM row computed while drafting is part of the target at
  that position too: the engine keeps it for the verify instead of decoding it again.
- `new_drafting(engine, drafter, alphas, limit)` is a request's starting `Drafting`, its
  drafter priced by `draft_cost` (a model drafter's step against a target's, from the bytes
  of weights each reads) and the verify's cost by where the base runs (CPU or GPU).
- `accept(draft_token, target, row, tokens, rng, q)` decides one position of a verify.
  `target` is the request's policy at that position (`next_token` draws from p,
  `distribution` gives p: the final distribution its sampler draws from, after the
  processors, penalties, filters and temperature); `q` is the drafter's distribution there as
  (ids, probabilities), None for a drafter that proposes x with certainty (prompt lookup).
  Draft token x is kept with probability min(1, p(x) / q(x)); at a rejection the token is
  drawn from max(0, p - q) normalised (for a certain drafter: p without x). So each token is
  distributed exactly as p, whatever the drafter proposes. Greedy requests keep a draft token
  while it equals the target's argmax, so their tokens equal non-speculative ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import guidance

if TYPE_CHECKING:
    from .engine import Engine, Sequence

# A model drafter ends its draft after a token it gave less than this probability: an unsure
# draft token is likely rejected, and every further one costs a drafter step (transformers'
# assisted generation stops at 0.4 too). The stop depends on the draft alone: still exact.
CONFIDENCE = 0.4
# A verify of m positions is taken to cost m ** exponent steps of the target: on a CPU with
# llama.cpp's extra buffer types off 3, 5 and 9 positions cost the 1.5B coder 1.65, 2.28 and
# 3.05 steps (m ** 0.5: 1.73, 2.24, 3; more with them on); on a GPU a verify costs little more
# than a step (assumed: not measured here).
VERIFY_EXPONENT_CPU, VERIFY_EXPONENT_GPU = 0.5, 0.1
PRIOR_KEPT, PRIOR_MISSED = 3, 1  # a new answer's draft tokens are taken as kept 3 times in 4


class LookupDrafter:
    """Prompt lookup: the continuation of the context's latest earlier n-gram match."""

    def __init__(self, max_ngram: int = 16, min_ngram: int = 4):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def draft(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0 or len(tokens) < 2:
            return []
        arr = np.asarray(tokens)
        for n in range(min(self.max_ngram, len(arr) - 1), self.min_ngram - 1, -1):
            k = min(k, n)  # a longer match is likelier to go on: draft no further than it
            tail = arr[-n:]
            # every start i < len - n where arr[i:i+n] == tail; the latest one wins
            hits = np.flatnonzero(arr[:len(arr) - n] == tail[0])
            for j in range(1, n):
                hits = hits[arr[hits + j] == tail[j]]
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist()
        return []


@dataclass(frozen=True, eq=False)
class ModelDrafter:
    """A drafter's row: the draft model's logits (if `draft_model`) + sum_i weights[i] * the
    log-probs of ARM i (the engine's ARM order)."""
    draft_model: bool
    weights: np.ndarray


@dataclass
class Drafting:
    """One answer's speculation: the next draft's length and the counts for its usage."""
    limit: int
    step_cost: float = 0.0  # a model drafter's step per draft token, as a share of a target step
    exponent: float = VERIFY_EXPONENT_CPU  # a verify of m positions costs m ** exponent steps
    drafted: int = 0
    accepted: int = 0
    missed: int = 0                # verifies that ended at a rejected draft token

    @property
    def rate(self) -> float:
        """How often a draft token is kept (given those before it were), with a prior."""
        return (self.accepted + PRIOR_KEPT) / (self.accepted + self.missed + PRIOR_KEPT +
                                               PRIOR_MISSED)

    @property
    def k(self) -> int:
        """The draft length with the most tokens per unit of cost (at least 1): k draft tokens,
        each kept at rate a, give (1 - a^(k+1)) / (1 - a) tokens a verify, for a verify of
        k + 1 positions and k drafter steps."""
        a, ks = min(self.rate, 0.999), np.arange(self.limit + 1)
        tokens = (1 - a ** (ks + 1)) / (1 - a)
        cost = (ks + 1) ** self.exponent + ks * self.step_cost
        return max(1, int(np.argmax(tokens / cost)))

    def verified(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.missed += accepted < drafted


def accept(draft_token: int, target, row: np.ndarray, tokens: list[int],
           rng: np.random.Generator, q: tuple[np.ndarray, np.ndarray] | None = None
           ) -> tuple[int, bool]:
    """The token at one drafted position, and whether it is the draft token (see the module's
    contract): exactly a draw from the target's distribution at that position."""
    if target.greedy:
        token = target.next_token(row, tokens, rng)
        return token, token == draft_token
    ids, probs = target.distribution(row, tokens)
    q_at = _probabilities(q, ids, draft_token)  # q over p's support
    at = np.flatnonzero(ids == draft_token)
    p_x = float(probs[at[0]]) if at.size else 0.0
    q_x = 1.0 if q is None else float(_probabilities(q, np.array([draft_token]), draft_token)[0])
    if rng.random() * q_x < p_x:  # kept with probability min(1, p(x) / q(x))
        return draft_token, True
    rest = np.maximum(probs - q_at, 0.0)  # max(0, p - q): zero wherever p is zero
    if not rest.sum() > 0:  # p <= q everywhere: a rejection cannot happen but by rounding
        rest = probs
    return draw(ids, rest, rng), False


def draw(ids: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    """One of ids, with probability proportional to its weight."""
    cum = np.cumsum(weights)
    i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), ids.size - 1)
    return int(ids[i])


def _probabilities(q, ids: np.ndarray, draft_token: int) -> np.ndarray:
    """q(t) for each t of ids (a certain drafter's q: 1 at the draft token, 0 elsewhere)."""
    if q is None:
        return (ids == draft_token).astype(np.float64)
    q_ids, q_probs = q
    order = np.argsort(q_ids)
    sorted_ids = q_ids[order]
    at = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.where(sorted_ids[at] == ids, q_probs[order][at], 0.0)


def draft_cost(engine: "Engine", drafter, alphas: np.ndarray) -> float:
    """A model drafter's step, as a share of a step of the target (the base and the ARMs on),
    from the bytes of weights each step reads; an ARM row it computes spares that ARM's verify
    position, which costs about a third of a step (0 for prompt lookup)."""
    if not isinstance(drafter, ModelDrafter):
        return 0.0
    target = engine.model.size + sum(a.context.model.size for a, w in zip(engine.arms, alphas)
                                     if w)
    reused = sum(a.context.model.size for a, w in zip(engine.arms, drafter.weights) if w)
    own = engine.drafter.model.size if drafter.draft_model else 0
    return (own + reused * 2 / 3) / target


def new_drafting(engine: "Engine", drafter, alphas: np.ndarray, limit: int | None) -> Drafting:
    """The speculation state a request's new answers start from: at most `limit` draft tokens
    (None: the most the engine was loaded for), priced for this engine."""
    return Drafting(limit or engine.max_draft, draft_cost(engine, drafter, alphas),
                    VERIFY_EXPONENT_GPU if engine.model.n_gpu_layers else VERIFY_EXPONENT_CPU)


# -- the proposer: what a step feeds each answer, and what it keeps --------------------------------

class Target(Protocol):
    """What the proposer reads of a request's policy (policy.Policy)."""
    greedy: bool
    drafter: object  # a LookupDrafter (anything with draft(tokens, k)), a ModelDrafter or None

    def next_token(self, row: np.ndarray, tokens: list[int], rng: np.random.Generator) -> int: ...

    def distribution(self, row: np.ndarray, tokens: list[int]
                     ) -> tuple[np.ndarray, np.ndarray]: ...


class Answer(Protocol):
    """What the proposer reads of an answer being generated (the scheduler's slot); it writes
    only `drafting`, its own state."""
    seq: "Sequence"
    pending: list[int]   # its tokens the contexts have not decoded yet
    tokens: list[int]    # its tokens so far
    rng: np.random.Generator
    drafting: Drafting | None
    constraint: object  # its grammar's state (constraints.Constraint), or None
    policy: Target
    max_tokens: int


@dataclass(frozen=True)
class Proposal:
    """What one step feeds an answer and how many rows it reads back: its pending token, then
    its draft (a model drafter's decodes have appended all but the last draft token), one row
    after the pending token and after each draft token."""
    feed: list[int]
    draft: list[int] = field(default_factory=list)
    qs: list | None = None  # the drafter's distribution at each draft token (None: certain)

    @property
    def rows(self) -> int:
        return 1 + len(self.draft)


class Proposer:
    """Speculative decoding for a scheduler's answers: `propose` drafts (every model-drafting
    answer of a step one token per round, in one decode per context), `keep` turns an answer's
    rows back into its next tokens by the acceptance rule and drops the rejected positions
    from every context. An answer that does not draft is fed its pending token and keeps one
    token drawn by its policy."""

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def propose(self, answers: list[Answer]) -> list[Proposal]:
        """Each answer's proposal (no draft on its first step, never past its max_tokens or the
        context)."""
        drafts: list[list[int]] = [[] for _ in answers]
        qs: list = [None] * len(answers)
        by_model: dict[int, int] = {}  # answer -> its room, for the model drafters
        for i, answer in enumerate(answers):
            room = self._room(answer)
            if room <= 0:
                continue
            drafter = answer.policy.drafter
            if isinstance(drafter, ModelDrafter):
                by_model[i] = room
            else:
                drafts[i] = drafter.draft(answer.seq.tokens + answer.pending, room)
                if answer.constraint is not None:  # only what its grammar allows is verified
                    drafts[i] = drafts[i][:answer.constraint.draftable(drafts[i])]
        if by_model:
            self._model_drafts(answers, by_model, drafts, qs)
        return [Proposal(drafts[i][-1:] if i in by_model and drafts[i] else
                         list(a.pending) + drafts[i], drafts[i], qs[i])
                for i, a in enumerate(answers)]

    def keep(self, answer: Answer, proposal: Proposal, rows: np.ndarray) -> list[int]:
        """An answer's next tokens from its rows: draft tokens as the policy accepts them
        (exactly its distribution), then the token drawn at the first rejection, or the bonus
        after the last draft token; the rejected positions leave every context."""
        policy, draft = answer.policy, proposal.draft
        if not draft:
            return [policy.next_token(rows[0], answer.tokens, answer.rng)]
        tokens: list[int] = []
        for i, row in enumerate(rows):
            history = answer.tokens + tokens
            if i < len(draft):
                token, kept = accept(draft[i], policy, row, history, answer.rng,
                                     proposal.qs[i] if proposal.qs else None)
            else:
                token, kept = policy.next_token(row, history, answer.rng), False
            tokens.append(token)
            if not kept:
                break
        accepted = len(tokens) - 1
        answer.drafting.verified(len(draft), accepted)
        self.engine.truncate(answer.seq, len(answer.seq.tokens) - len(draft) + accepted)
        return tokens

    def _room(self, answer: Answer) -> int:
        if answer.drafting is None or not answer.tokens:
            return 0
        return min(answer.drafting.k, answer.max_tokens - len(answer.tokens) - 1,
                   self.engine.n_ctx - len(answer.seq.tokens) - len(answer.pending))

    def _model_drafts(self, answers: list[Answer], rooms: dict[int, int],
                      drafts: list[list[int]], qs: list) -> None:
        """Draft with models, one token of every drafting answer per round; greedy answers
        draft the drafter's argmax, sampled ones a draw from its distribution. A draft ends
        at its room or after a token the drafter was unsure of."""
        rooms, drafted = dict(rooms), list(rooms)
        feed = {i: list(answers[i].pending) for i in rooms}
        for i in rooms:
            qs[i] = []
        while rooms:
            drafters = [answers[i].policy.drafter for i in rooms]
            rows = self.engine.draft_step([answers[i].seq for i in rooms],
                                          [feed[i] for i in rooms],
                                          [d.draft_model for d in drafters],
                                          np.stack([d.weights for d in drafters]))
            for i, row in zip(list(rooms), rows):
                answer = answers[i]
                policy, history = answer.policy, answer.tokens + drafts[i]
                grammar = answer.constraint
                if grammar is not None:  # q is the masked drafter's, as p is the masked target's
                    row = grammar.mask_row(row)
                if policy.greedy:
                    token, q = policy.next_token(row, history, answer.rng), None
                    sure = np.exp(guidance.log_softmax(row)[token])
                else:
                    q = policy.distribution(row, history)
                    token = draw(*q, answer.rng)
                    sure = q[1][np.flatnonzero(q[0] == token)[0]]
                if grammar is not None and not grammar.try_draft(token):
                    # the grammar ends here or engages after it: the draft ends before it,
                    # its last token (decoded this round) fed again with the verify
                    self.engine.truncate(answer.seq, len(answer.seq.tokens) - 1)
                    del rooms[i], feed[i]
                    continue
                drafts[i].append(token)
                qs[i].append(q)
                feed[i] = [token]
                if sure < CONFIDENCE or len(drafts[i]) >= rooms[i]:
                    del rooms[i], feed[i]
        for i in drafted:
            if answers[i].constraint is not None:
                answers[i].constraint.undo_drafts()  # the verify's masks start where it stood

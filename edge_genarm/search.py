"""Search guided by the ARMs' own reward: an answer grows a segment at a time; at each segment,
K continuations of every kept candidate are sampled from the guided distribution side by side
(sequences that share the prefix's KV cells), each is scored, and the best B go on.

Contract:
- `Search(request, searches, alpha_sum)` is a search request's finish hook (see
  `policy.Emit`; alpha_sum, its ARM weights summed, is the base's weight for arm-base). It holds
  each candidate's events, adds up each candidate's score as its tokens come
  (`emit(event, row, reward)`), and answers the scheduler's `waits(index, finish, seq)`: a
  candidate waits at the end of its segment (`segment_ends`) or when it ends (end of
  generation, a stop string, max_tokens, a full context). A waiting candidate is not decoded;
  its last token joins its sequence (`whole`), where the reward model can read it.
- `Searches.run()`, after each step, returns a `Regroup` for every request whose candidates all
  wait: scored (the reward model scores a step's waiting candidates in one decode), ranked (by
  score, ties to the lower index), and then either the request ends with `winner` (the best
  candidate has ended) or every candidate goes on as a copy of `parents[i]` (itself for the B
  best that go on; the others copy them in turn), with a generator seeded by
  (seed, segment, i). The scheduler applies it: the copy shares its parent's KV cells and the
  loser's own cells are freed at once. A candidate that ended but is not the best is dropped.
- Scores, of the answer so far: "arm" sums sum_i alpha_i * log pi_arm_i(token | prefix) over
  its tokens (GenARM's reward of the answer); "arm-base" sums
  sum_i alpha_i * (log pi_arm_i - log pi_base) (the reward against the base's, as DPO's
  implicit reward: what the ARM prefers beyond plain fluency); with search_fluency F both add
  F * log pi_base (a reward against the base that still values the base's fluency); "guided"
  sums the guided log-probs (after the grammar's mask, before penalties and temperature); all
  three rank per token (the sum over the answer's length: a sum of log-probs favours whatever
  is shortest, as a segment that ends at the first line break). "reward" is the reward
  model's score of the answer so far.
- Events: once a regroup keeps one candidate's line (one beam), its events go out as answer
  0, so that a stream shows the answer a segment at a time; with several beams, at the end.
  The answer's `Usage.decoded_tokens` counts every candidate's tokens: the compute it took.
- Seeded and batch-independent: every draw comes from the candidate's own generator and every
  decision from its own scores, so a request gives the same answer alone or in any batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from . import guidance
from .text import STOPPED

if TYPE_CHECKING:
    from .engine import Engine, Sequence
    from .policy import Ended, Request

# a sentence ends at a terminator, closing quotes or brackets after it, then space or nothing
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*\s*$")


def segment_ends(rule: str, count: int, text: str) -> bool:
    """Whether a segment of `count` tokens ends with the token whose text is `text`."""
    if rule == "answer":
        return False
    if rule.isdigit():
        return count >= int(rule)
    return "\n" in text or (rule == "sentence" and bool(_SENTENCE_END.search(text)))


@dataclass(frozen=True)
class Regroup:
    """A searching request's step: it ends with `winner`, or candidate i goes on as a copy of
    `parents[i]` with a generator seeded by `seeds[i]`; `events` go out now."""
    handle: object
    winner: int | None
    parents: tuple[int, ...] = ()
    seeds: tuple[tuple[int, ...], ...] = ()
    events: tuple = ()


class Search:
    """A search request's candidates: their held events, scores and segments."""

    def __init__(self, request: "Request", searches: "Searches", alpha_sum: float):
        self.request, self.searches = request, searches
        m = request.answers
        # the base's weight in the reward rows: against the base, as much as all the ARMs',
        # less the weight the request gives fluency
        self.wants_rewards = None
        if request.ranks_by_arms:
            against = alpha_sum if request.search_score == "arm-base" else 0.0
            self.wants_rewards = against - request.search_fluency
        self.scores = np.zeros(m, dtype=np.float64)
        self.held: list[list] = [[] for _ in range(m)]  # events not yet sent, per candidate
        self.count = [0] * m        # tokens in the candidate's current segment
        self.length = np.zeros(m)   # tokens in the candidate's answer so far
        self.decoded = 0            # every candidate's tokens
        self.waiting: dict[int, tuple[str | None, "Sequence"]] = {}
        self.segment = 0
        self.winner: int | None = None
        self.handle = None

    def emit(self, event, row: np.ndarray | None = None,
             reward: np.ndarray | None = None) -> list:
        self.handle = event.handle
        self.held[event.index].append(event)
        if event.token is not None:
            i, token = event.index, event.token
            self.decoded += 1
            self.count[i] += 1
            self.length[i] += 1
            if self.request.search_score == "guided":
                self.scores[i] += float(guidance.log_softmax(row)[token])
            elif reward is not None:
                self.scores[i] += float(reward[token])
        return []

    def waits(self, index: int, finish: str | None, seq: "Sequence") -> bool:
        if finish in STOPPED:
            return False
        if finish is None and not segment_ends(self.request.segment, self.count[index],
                                               self.held[index][-1].text):
            return False
        self.waiting[index] = (finish, seq)
        if len(self.waiting) == len(self.held):
            self.searches.ready.append(self)
        return True

    def whole(self, reason: str | None) -> bool:
        return reason not in STOPPED  # a waiting candidate's last token joins its sequence

    def ended(self, answer: "Ended") -> list:
        if answer.reason in STOPPED:  # the stream ends with answer 0's close
            self.held = [[] for _ in self.held]
            return [answer.event] if answer.index == 0 else []
        if answer.index != self.winner:
            return []
        answer.event.usage.decoded_tokens = self.decoded
        return [replace(e, index=0) for e in self.held[self.winner]]

    def verdict(self, rewards: np.ndarray | None) -> Regroup:
        """Rank the waiting candidates (every one waits) and say what happens to each."""
        if rewards is not None:
            self.scores[:] = rewards
        m, ended = len(self.held), {i: f for i, (f, _) in self.waiting.items()}
        rank = self.scores if rewards is not None else self.scores / np.maximum(self.length, 1)
        order = sorted(range(m), key=lambda i: (-rank[i], i))
        self.waiting = {}
        if ended[order[0]] is not None:
            self.winner = order[0]
            return Regroup(self.handle, order[0])
        kept = [i for i in order if ended[i] is None][:self.request.beams]
        others = [i for i in range(m) if i not in kept]
        parents = list(range(m))
        for j, i in enumerate(others):
            parents[i] = kept[j % len(kept)]
        self.scores, self.length = self.scores[parents], self.length[parents]
        self.held = [list(self.held[p]) for p in parents]
        self.count = [0] * m
        events: tuple = ()
        if len(kept) == 1:  # one line goes on: what it said so far is final
            events = tuple(replace(e, index=0) for e in self.held[kept[0]])
            self.held = [[] for _ in range(m)]
        self.segment += 1
        seed = self.request.seed
        return Regroup(self.handle, None, tuple(parents),
                       tuple((seed, self.segment, i) for i in range(m)), events)

    @property
    def sequences(self) -> list["Sequence"]:
        return [self.waiting[i][1] for i in range(len(self.held))]


class Searches:
    """The searching requests whose candidates all wait, regrouped after a step together."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.ready: list[Search] = []

    def run(self) -> list[Regroup]:
        ready, self.ready = self.ready, []
        scored = [s for s in ready if s.request.search_score == "reward"]
        rewards = iter(self.engine.sequence_rewards([q for s in scored for q in s.sequences])
                       if scored else ())
        out = []
        for s in ready:
            r = np.array([next(rewards) for _ in s.held], dtype=np.float64) \
                if s in scored else None
            out.append(s.verdict(r))
        return out

"""Exact speculative decoding against a guided target, in pure NumPy.

Contract:
- A drafter proposes the next tokens of an answer from its tokens so far. `LookupDrafter`
  (prompt lookup) costs no model: it finds the latest earlier occurrence of the context's last
  n tokens (n from `max_ngram` down to `min_ngram`, 16 to 4) and proposes at most n of the
  tokens that followed it (a longer match is likelier to go on; on this CPU a verify of k + 1
  positions costs nearly k + 1 steps, so short, spurious matches must not draft); where nothing
  matches it proposes nothing, so a row that drafts nothing decodes as usual.
- `Drafting` is one answer's state: how many tokens to draft next (up to its limit; +2 after a
  verify that kept every draft token, -1 after one that did not) and the counts its usage
  reports (drafted, accepted).
- `accept(draft_token, target, tokens, rng)` decides one position of a verify. `target` is the
  request's policy at that position (`next_token` draws from p, `distribution` gives p: the
  final distribution its sampler draws from, after the processors, penalties, filters and
  temperature). A draft token x from a drafter that proposes it with certainty (q = the point
  mass at x, as prompt lookup does) is kept with probability min(1, p(x) / q(x)) = p(x); at a
  rejection the token is drawn from max(0, p - q) normalised, which is p without x. So each
  token is distributed exactly as p, whatever the drafter proposes. Greedy requests keep a
  draft token while it equals the target's argmax, so their tokens equal non-speculative ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAFTERS = ("lookup",)


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


@dataclass
class Drafting:
    """One answer's speculation: the next draft's length and the counts for its usage."""
    limit: int
    k: int = 0
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self):
        self.k = self.k or self.limit

    def verified(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            self.k = min(self.limit, self.k + 2) if accepted == drafted else max(1, self.k - 1)


def accept(draft_token: int, target, row: np.ndarray, tokens: list[int],
           rng: np.random.Generator) -> tuple[int, bool]:
    """The token at one drafted position, and whether it is the draft token (see the module's
    contract): exactly a draw from the target's distribution at that position."""
    if target.greedy:
        token = target.next_token(row, tokens, rng)
        return token, token == draft_token
    ids, probs = target.distribution(row, tokens)
    at = np.flatnonzero(ids == draft_token)
    p_x = float(probs[at[0]]) if at.size else 0.0
    if rng.random() < p_x:
        return draft_token, True
    rest = probs.copy()
    rest[at] = 0.0  # p without x, normalised: max(0, p - q) for a point mass q
    cum = np.cumsum(rest)
    i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), ids.size - 1)
    return int(ids[i]), False

"""What a request's caller holds and reads: its handle, its events and each answer's usage.

Contract:
- `Handle` is a submitted request: its `Request`, its `Policy`, how many answers it generates
  (`n`) and how many have ended (`done` once all have); `sequences` maps an answer's index to
  the engine sequence it ran on (a conversation goes on from it). The scheduler writes it; its
  caller reads it.
- `Event` is one answer's next token with the text that became final with it; the last event
  of an answer has its finish reason and `Usage` (OpenAI's names where OpenAI has one).
- `logprob_of(row, token, top)` is the `TokenLogprob` an event reports: the token's log-prob
  and the top alternatives under the row's normalised distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import guidance

if TYPE_CHECKING:
    from .engine import Sequence
    from .policy import Policy, Request


@dataclass
class Usage:
    """One answer's record, with OpenAI's names where OpenAI has one."""
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0             # prompt tokens copied from another sequence's cache
    time_to_first_token: float = 0.0   # seconds from submit to the first token
    tokens_per_second: float = 0.0     # tokens after the first over the time since the first
    finish_reason: str | None = None
    drafted_tokens: int = 0            # speculative: draft tokens verified
    accepted_tokens: int = 0           # speculative: of those, kept
    error: str | None = None           # why an answer ended with finish reason "grammar_error"
    decoded_tokens: int = 0            # tokens sampled for it: every candidate's (best-of-n,
                                       # search), its own otherwise: the compute it took

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

    def __init__(self, request: Request, policy: Policy, submitted: float):
        self.request, self.policy, self.submitted = request, policy, submitted
        self.n = policy.answers  # answers generated
        self.finished = 0  # answers that have ended
        self.sequences: dict[int, Sequence] = {}  # answer index -> the sequence it ran on

    @property
    def done(self) -> bool:
        return self.finished >= self.n


def logprob_of(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-prob and the top alternatives, over the guided distribution."""
    logprobs = guidance.log_softmax(row)
    best = np.argpartition(-logprobs, top)[:top] if 0 < top < logprobs.size else \
        np.arange(logprobs.size if top else 0)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(int(token), float(logprobs[token]),
                        tuple((int(i), float(logprobs[i])) for i in best))

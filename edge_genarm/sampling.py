"""Samplers in pure NumPy, built into one function by `make_sampler`.

Contract: a sampler takes one row of guided log-probabilities (any additive constant) and a
`numpy.random.Generator` and returns a token id. The filters work on a candidate set, a pair
(ids, values), so that each step after top-k touches only the survivors:

    top-k -> top-p -> min-p   (each on the distribution left by the one before, at T = 1)
    then sample from softmax(values / T); T = 0 or greedy takes the argmax.

Filtering before temperature follows mlx-lm and the GenARM paper's formula: with T = 1 and no
filter the sample is drawn from exactly softmax(guided).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import fields
from .fields import SettingError, option

__all__ = ["SamplingSettings", "SettingError", "make_sampler", "make_distribution"]

# (token ids, their scores); ids None means "every id, in order", which saves building and
# indexing a vocabulary-sized arange on every token before the first filter narrows the set.
Candidates = tuple["np.ndarray | None", np.ndarray]
Sampler = Callable[[np.ndarray, np.random.Generator], int]
MAX_TEMPERATURE = 1e4
DRY_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's default sequence breakers


def greedy(logprobs: np.ndarray) -> int:
    """The most likely token; ties go to the lowest id, as numpy.argmax does."""
    return int(np.argmax(logprobs))


def all_candidates(logprobs: np.ndarray) -> Candidates:
    return None, np.asarray(logprobs, dtype=np.float32)


def candidate_ids(cands: Candidates) -> np.ndarray:
    ids, vals = cands
    return np.arange(vals.size) if ids is None else ids  # for callers that want them spelled out


def _keep(cands: Candidates, keep: np.ndarray) -> Candidates:
    ids, vals = cands
    return (keep if ids is None else ids[keep]), vals[keep]


def _probs(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - np.max(values))
    return e / e.sum()


def top_k(cands: Candidates, k: int) -> Candidates:
    """Keep the k most likely candidates (k = 0 keeps all)."""
    vals = cands[1]
    if k <= 0 or k >= vals.size:
        return cands
    if np.isneginf(vals).any():
        # a masked row: partitioning thousands of equal -inf values costs milliseconds, and a
        # banned token is never drawn, so only the allowed ones are ranked
        live = np.flatnonzero(vals > -np.inf)
        if 0 < live.size <= k:
            return _keep(cands, live)
        if live.size:
            return _keep(cands, live[np.argpartition(vals[live], live.size - k)[live.size - k:]])
    return _keep(cands, np.argpartition(vals, vals.size - k)[vals.size - k:])


def top_p(cands: Candidates, p: float) -> Candidates:
    """Keep the smallest most-likely set whose probability reaches p (at least one token).

    Sorting the whole vocabulary costs milliseconds; the nucleus is usually small, so look at the
    best m candidates first and widen m only when they do not reach p. The result is exact.
    """
    vals = cands[1]
    if p >= 1.0 or vals.size <= 1:
        return cands
    probs = _probs(vals)
    m = 64
    while True:
        if m >= vals.size:
            part = np.arange(vals.size)
        else:
            part = np.argpartition(-probs, m - 1)[:m]
        order = part[np.argsort(-probs[part], kind="stable")]
        cum = np.cumsum(probs[order])
        if cum[-1] >= p or m >= vals.size:
            n = int(np.searchsorted(cum, p)) + 1
            return _keep(cands, order[:min(n, order.size)])
        m *= 8


def min_p(cands: Candidates, p: float) -> Candidates:
    """Keep candidates whose probability is at least p times the most likely one's."""
    vals = cands[1]
    if p <= 0.0:
        return cands
    return _keep(cands, np.flatnonzero(vals >= np.max(vals) + np.log(np.float32(p))))


def categorical(cands: Candidates, temperature: float, rng: np.random.Generator) -> int:
    """Draw one id from softmax(values / temperature) with one uniform number from rng."""
    ids, vals = cands
    probs = np.exp((vals - np.max(vals)) / np.float32(temperature))
    cum = np.cumsum(probs, dtype=np.float64)  # float64 sums keep the tail of a big vocabulary
    i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), vals.size - 1)
    return i if ids is None else int(ids[i])


def _breakers(given) -> tuple[str, ...]:
    """DRY breakers as a user types them: 'none' alone clears them; \\n, \\t and \\\\ are the
    escapes a shell makes awkward."""
    given = [given] if isinstance(given, str) else list(given)
    if given == ["none"]:
        return ()
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    return tuple(re.sub(r"\\([nt\\])", lambda m: escapes[m.group(1)], text) for text in given)


@dataclass(frozen=True)
class SamplingSettings:
    """Defaults are llama.cpp's; T = 1 with every filter and penalty off samples
    softmax(guided) exactly. The penalties (off by default) are `penalties.penalize`'s."""
    temperature: float = option(0.8, "Sampling temperature; 0 takes the argmax.", short="-t",
                                low=0.0, high=MAX_TEMPERATURE, rule="a finite number >= 0",
                                # float32 scores / t underflow beyond it
                                high_rule=f"at most {MAX_TEMPERATURE:g} (every candidate is "
                                "then about equally likely)")
    top_k: int = option(40, "Keep the k most likely tokens (0: off).", low=0,
                        hint="(0 turns it off)")
    top_p: float = option(0.95, "Keep the most likely tokens up to this probability (1: off).",
                          low=0.0, above=True, high=1.0, hint="(1 turns it off)")
    min_p: float = option(0.05, "Keep tokens at least this fraction as likely as the best "
                          "(0: off).", low=0.0, high=1.0, rule="in [0, 1]",
                          hint="(0 turns it off)")
    greedy: bool = option(False, "Always take the most likely token.")
    presence_penalty: float = option(0.0, "Subtract this from every token the answer already "
                                     "holds (-2 to 2, as OpenAI's).", low=-2.0, high=2.0,
                                     hint="(0 turns it off)")
    frequency_penalty: float = option(0.0, "Subtract this times its count from every token the "
                                      "answer already holds (-2 to 2, as OpenAI's).", low=-2.0,
                                      high=2.0, hint="(0 turns it off)")
    dry_multiplier: float = option(0.0, "DRY: penalize a token that would extend a repeat of "
                                   "the answer's own text, by MULTIPLIER * BASE^(length - "
                                   "ALLOWED) (0: off).", low=0.0, hint="(0 turns it off)")
    dry_base: float = option(1.75, "DRY: how fast the penalty grows with the repeat's length.",
                             low=1.0)
    dry_allowed_length: int = option(2, "DRY: repeats up to this many tokens go unpenalized.",
                                     low=1)
    dry_sequence_breakers: tuple[str, ...] = option(
        DRY_BREAKERS, "DRY: a repeat never reaches back across a token holding STRING (\\n for "
        "a newline); 'none' for no breakers.", flag="--dry-sequence-breaker", metavar="STRING",
        parse=_breakers, show="\\n : \" *")

    def validate(self) -> None:
        """Raise `SettingError` (a ValueError) for the first setting out of range: the one
        check of every sampling setting, for the commands, the Python API and the server."""
        fields.check(self)

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the sampler then needs the answer's tokens so far)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.dry_multiplier)

    def penalties(self) -> dict:
        """The penalty settings that are on, by name (for a record of what made an answer)."""
        on = {name: getattr(self, name) for name in ("presence_penalty", "frequency_penalty")
              if getattr(self, name)}
        if self.dry_multiplier:
            on.update(dry_multiplier=self.dry_multiplier, dry_base=self.dry_base,
                      dry_allowed_length=self.dry_allowed_length,
                      dry_sequence_breakers=list(self.dry_sequence_breakers))
        return on

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def make_distribution(settings: SamplingSettings):
    """The distribution `make_sampler(settings)` draws from, as a function from a row to
    (token ids, probabilities in float64): what speculative decoding accepts a draft against.
    Greedy: the argmax, with probability 1."""
    def distribution(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if settings.is_greedy:
            return np.array([greedy(logprobs)]), np.ones(1)
        cands = min_p(top_p(top_k(all_candidates(logprobs), settings.top_k), settings.top_p),
                      settings.min_p)
        vals = cands[1].astype(np.float64)
        probs = np.exp((vals - vals.max()) / settings.temperature)
        return candidate_ids(cands), probs / probs.sum()

    return distribution


def make_sampler(settings: SamplingSettings) -> Sampler:
    """One function from logprobs and rng to a token id, with only the steps that are on."""
    settings.validate()
    if settings.is_greedy:
        return lambda logprobs, rng: greedy(logprobs)

    def sample(logprobs: np.ndarray, rng: np.random.Generator) -> int:
        cands = all_candidates(logprobs)
        cands = top_k(cands, settings.top_k)
        cands = top_p(cands, settings.top_p)
        cands = min_p(cands, settings.min_p)
        return categorical(cands, settings.temperature, rng)

    return sample

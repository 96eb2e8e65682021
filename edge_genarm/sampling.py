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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

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


class SettingError(ValueError):
    """A sampling setting out of range; `field` is its name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingSettings:
    """Defaults are llama.cpp's; T = 1 with every filter and penalty off samples
    softmax(guided) exactly. The penalties (off by default) are `penalties.penalize`'s."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    greedy: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str, ...] = field(default=DRY_BREAKERS)

    def validate(self) -> None:
        """Raise `SettingError` (a ValueError) for the first setting out of range: the one
        check of every sampling setting, for the commands, the Python API and the server."""
        t = self.temperature
        _require("temperature", np.isfinite(t) and t >= 0,
                 f"temperature must be a finite number >= 0, got {t}")
        _require("temperature", t <= MAX_TEMPERATURE,  # float32 scores / t would underflow
                 f"temperature must be at most {MAX_TEMPERATURE:g} (every candidate is then "
                 f"about equally likely), got {t:g}")
        _require("top_k", self.top_k >= 0, f"top-k must be >= 0 (0 turns it off), got {self.top_k}")
        _require("top_p", 0.0 < self.top_p <= 1.0,
                 f"top-p must be in (0, 1] (1 turns it off), got {self.top_p}")
        _require("min_p", 0.0 <= self.min_p <= 1.0,
                 f"min-p must be in [0, 1] (0 turns it off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(name, np.isfinite(value) and -2.0 <= value <= 2.0,
                     f"{_flag(name)} must be between -2 and 2 (0 turns it off), got {value}")
        _require("dry_multiplier", np.isfinite(self.dry_multiplier) and self.dry_multiplier >= 0,
                 f"dry-multiplier must be a finite number >= 0 (0 turns it off), got "
                 f"{self.dry_multiplier}")
        _require("dry_base", np.isfinite(self.dry_base) and self.dry_base >= 1,
                 f"dry-base must be a finite number >= 1, got {self.dry_base}")
        _require("dry_allowed_length", self.dry_allowed_length >= 1,
                 f"dry-allowed-length must be >= 1, got {self.dry_allowed_length}")
        _require("dry_sequence_breakers",
                 all(isinstance(b, str) and b for b in self.dry_sequence_breakers),
                 "dry-sequence-breaker must be a non-empty string")

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


def _require(field: str, ok, message: str) -> None:
    if not ok:
        raise SettingError(field, message)


def _flag(name: str) -> str:
    return name.replace("_", "-")


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

"""Penalties on repetition, in pure NumPy, over the tokens an answer has generated so far.

Contract: `penalize(row, history, settings, breakers)` returns the row (guided log-probs, any
additive constant) less each token's penalty; with every penalty off it returns `row` itself.
`history` is the answer's own tokens, never the prompt: an answer may quote its prompt (a coder
restates the function it was asked for), and only its own repetition is penalized.

- presence and frequency (OpenAI's): a token already in the answer loses
  `presence + frequency * count`.
- DRY ("don't repeat yourself", as llama.cpp and koboldcpp have it): if the answer's last n
  tokens already occurred earlier, followed by token t, writing t would extend the repeat, and
  t loses `multiplier * base ** (n - allowed_length)` for the longest such n >= allowed_length.
  A sequence breaker (a token whose text holds one of the breaker strings, such as a newline)
  ends the repeat looked at: the match never reaches back across one, so that a loop of
  whole lines is caught inside each line, not as one ever longer match.
"""

from __future__ import annotations

import math

import numpy as np

# exponent at which a DRY penalty already outweighs any log-prob gap (e^40); longer matches
# add nothing and a long history would only cost time
MAX_DRY_PENALTY = 40.0


def occurrence_penalty(row: np.ndarray, history, presence: float, frequency: float
                       ) -> np.ndarray:
    """Row less presence + frequency * count for every token the history holds."""
    tokens, counts = np.unique(np.asarray(history, dtype=np.intp), return_counts=True)
    keep = tokens < row.size
    tokens, counts = tokens[keep], counts[keep]
    out = np.array(row, dtype=np.float32)
    out[tokens] -= np.float32(presence) + np.float32(frequency) * counts.astype(np.float32)
    return out


def repeat_lengths(history, breakers: np.ndarray | None = None, max_length: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """For each earlier position j, the length of the longest run ending at j - 1 that equals the
    history's last tokens (its suffix), cut at the last breaker; returns (tokens that followed
    such a run, the longest run length for each), each token once.

    `breakers` is a boolean mask over the vocabulary. The search walks back one token at a time
    over the positions still matching, so its cost is the history's length times the repeat's.
    """
    h = np.asarray(history, dtype=np.intp)
    n = h.size
    if n < 2:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    suffix = n
    if breakers is not None:
        hit = np.flatnonzero(breakers[np.minimum(h, breakers.size - 1)] & (h < breakers.size))
        if hit.size:
            suffix = n - 1 - int(hit[-1])  # tokens after the last breaker
    if max_length is not None:
        suffix = min(suffix, max_length)
    at = np.flatnonzero(h[:n - 1] == h[n - 1]) + 1  # j: h[j - 1] matches the last token
    lengths = np.zeros(n, dtype=np.intp)
    k = 1
    while at.size and k <= suffix:
        lengths[at] = k
        k += 1
        at = at[at - k >= 0]
        at = at[h[at - k] == h[n - k]]
    found = np.flatnonzero(lengths)
    if not found.size:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    tokens, runs = h[found], lengths[found]
    order = np.lexsort((-runs, tokens))  # by token, longest run first
    tokens, runs = tokens[order], runs[order]
    first = np.concatenate(([True], tokens[1:] != tokens[:-1]))
    return tokens[first], runs[first]


def dry_penalty(row: np.ndarray, history, multiplier: float, base: float, allowed_length: int,
                breakers: np.ndarray | None = None) -> np.ndarray:
    """Row less multiplier * base ** (n - allowed_length) for each token that would extend a
    repeat of n >= allowed_length tokens, at most MAX_DRY_PENALTY (or the multiplier, if more)."""
    if multiplier <= 0:
        return row
    cap = max(MAX_DRY_PENALTY, multiplier)
    # a repeat this long is penalized at the cap already: the search need not look further
    steps = math.ceil(math.log(cap / multiplier) / math.log(base)) if base > 1 else 0
    tokens, runs = repeat_lengths(history, breakers, allowed_length + steps)
    keep = (runs >= allowed_length) & (tokens < row.size)
    if not keep.any():
        return row
    tokens, runs = tokens[keep], runs[keep]
    penalty = np.minimum(multiplier * np.power(float(base), runs - allowed_length), cap)
    out = np.array(row, dtype=np.float32)
    out[tokens] -= penalty.astype(np.float32)
    return out


def penalize(row: np.ndarray, history, settings, breakers: np.ndarray | None = None
             ) -> np.ndarray:
    """Every penalty `settings` (a SamplingSettings) turns on, applied to one row."""
    if not history or not settings.penalized:
        return row
    if settings.presence_penalty or settings.frequency_penalty:
        row = occurrence_penalty(row, history, settings.presence_penalty,
                                 settings.frequency_penalty)
    if settings.dry_multiplier > 0:
        row = dry_penalty(row, history, settings.dry_multiplier, settings.dry_base,
                          settings.dry_allowed_length, breakers)
    return row

"""Penalties on repetition, in pure NumPy, over the tokens an answer has generated so far.

Contract: `penalize(row, history, settings, breakers)` returns the row (guided log-probs, any
additive constant) less each token's penalty, in float32; with every penalty off it returns
`row` itself. `history` is the answer's own tokens, never the prompt: an answer may quote its
prompt (a coder restates the function it was asked for), and only its own repetition is
penalized. On that history the result equals llama.cpp's samplers fed the same tokens with
`llama_sampler_accept` (tests/test_penalties.py holds it to them on real tokenizers):

- presence and frequency (OpenAI's, llama.cpp's `penalties` sampler with repeat 1): a token
  already in the answer loses `presence + frequency * count`.
- DRY ("don't repeat yourself", llama.cpp's `llama_sampler_dry`, from koboldcpp). The window is
  the answer's last `last_n` tokens (llama.cpp's `dry_penalty_last_n`; None, as the scheduler
  passes, is the whole answer). A repeat may reach back no further than the end of the last
  sequence breaker in the window (`rep_limit`). For each earlier position p, the repeat there
  is the longest run ending at p that equals the window's last tokens, cut at `rep_limit`; the
  token after p, written next, would extend it, and loses
  `multiplier * base ** (n - allowed_length)` for its longest such run n >= allowed_length.
  The exponent is clamped only where the float would overflow (at 88.72 / ln(base)), so the
  penalty has no cap; a token that is a breaker by itself is never penalized.
- Breakers (`Breakers`, built by `process_breakers` from every token's text as llama.cpp
  renders it): a token whose text holds a breaker string is a breaker by itself; a token whose
  text ends with the start of one is the head of a breaker that the tokens of the string's rest
  (tokenized alone) complete. The most recent head, in the window, followed by one of its tails
  ends the repeat looked at, so that a loop of whole lines is caught inside each line.

Arithmetic is llama.cpp's: the power in double (`math.pow`, the C library's), times the float32
multiplier, rounded to float32 (infinity past its range), subtracted in float32; the rows are
bit for bit llama.cpp's. Breaker pieces are rendered as llama.cpp renders them for DRY (one
token detokenized, special tokens as their text). The clamp's ln(base) is Python's double one
rounded to float32, not the C library's float `logf` (which varies with the platform's libm):
over 400,000 random bases, glibc's truncates to an exponent one apart for 25 (for none of
1.01, 1.1, 1.2, 1.25, 1.3, 1.5, 1.75, 2, 2.5, 3, 4, 5, 10), which moves only a penalty at the
clamp, above multiplier * 3.4e38 / base ** 2 either way.

Two differences, both deliberate:
- the window is the answer alone; llama.cpp's server also feeds the prompt to its samplers.
  An answer may quote its prompt (see above).
- the window is the whole answer; llama.cpp's command line and server default to the last 64
  tokens (`dry_penalty_last_n`), which edge-genarm has no setting for (`last_n` is here for a
  caller that wants it), and the README's HumanEval and weak-to-strong figures were measured on
  the whole answer. Measured on 5 greedy answers of 256 tokens at the coder setting (0.8, 1.75,
  2, the four breakers): a 64-token window changes the row at 62, 28 and 16 of 256 steps on
  three SmolLM2 answers (its greedy token first at steps 81, 144 and 99) and at 11 and 7 on two
  Qwen2.5-Coder-0.5B ones (its greedy token never): a repeat of something more than 64 tokens
  back is still penalized here.

Cost per row and step: one vectorised pass over the window, then one vectorised step per token
of the longest repeat, at most `rep_limit` and the clamp (160 at base 1.75, `allowed_length`
at base 1), and a Python step per breaker head after the last single-token breaker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

# llama.cpp's bounds on its breakers: a string is cut to 40 bytes, the tokens that complete a
# breaker after its head to 20 (with them, finding the last breaker is linear in the window)
MAX_BREAKER_BYTES = 40
MAX_TAIL_TOKENS = 20
# ln(FLT_MAX) as llama.cpp writes it: beyond base ** (this / ln base) a float32 would overflow
FLOAT_MAX_LOG = np.float32(88.7228391)


@dataclass(frozen=True, eq=False)
class Breakers:
    """DRY's sequence breakers over one vocabulary, as llama.cpp processes them.

    `single`: a boolean mask over the vocabulary, the tokens that are a breaker by themselves.
    `tails`: head token -> the token sequences that, right after it, complete a breaker.
    `head` (derived): the mask of tokens that may start a breaker, alone or with a tail.
    """
    single: np.ndarray
    tails: Mapping[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    head: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        head = np.array(self.single, dtype=bool)
        head[list(self.tails)] = True
        object.__setattr__(self, "head", head)

    def longest_tail(self, window: np.ndarray, at: int) -> int:
        """The length of the longest breaker tail that follows the head at `at` in the window
        (0 for a breaker by itself), or -1 when none does."""
        token, after = int(window[at]), window[at + 1:]
        longest = 0 if self.single[token] else -1
        for tail in self.tails.get(token, ()):
            n = len(tail)
            if longest < n <= after.size and tuple(after[:n].tolist()) == tail:
                longest = n
        return longest


def process_breakers(strings: Iterable[str], pieces: Sequence[bytes],
                     tokenize: Callable[[bytes], Sequence[int]]) -> Breakers | None:
    """`Breakers` from the breaker strings, every token's text (`pieces`, by id, as llama.cpp's
    DRY renders it) and the tokenizer (bytes -> ids, no special tokens); None for no strings."""
    wanted = [s.encode("utf-8")[:MAX_BREAKER_BYTES] for s in strings]
    if not wanted:
        return None
    single = np.zeros(len(pieces), dtype=bool)
    tails: dict[int, set[tuple[int, ...]]] = {}
    rests: dict[bytes, tuple[int, ...]] = {}
    for token, piece in enumerate(pieces):
        for b in wanted:
            if b in piece:
                single[token] = True
                continue
            # the piece ends with the first k bytes of the breaker: the rest must follow
            for k in range(1, min(len(b), len(piece) + 1)):
                if piece.endswith(b[:k]):
                    rest = b[k:]
                    if rest not in rests:
                        rests[rest] = tuple(tokenize(rest))[:MAX_TAIL_TOKENS]
                    if rests[rest]:
                        tails.setdefault(token, set()).add(rests[rest])
                    else:  # nothing to complete: llama.cpp's empty tail, a breaker by itself
                        single[token] = True
    return Breakers(single, {t: tuple(s) for t, s in tails.items()})


def occurrence_penalty(row: np.ndarray, history, presence: float, frequency: float
                       ) -> np.ndarray:
    """Row less presence + frequency * count for every token the history holds."""
    tokens, counts = np.unique(np.asarray(history, dtype=np.intp), return_counts=True)
    keep = tokens < row.size
    tokens, counts = tokens[keep], counts[keep]
    out = np.array(row, dtype=np.float32)
    out[tokens] -= np.float32(presence) + np.float32(frequency) * counts.astype(np.float32)
    return out


def repeat_limit(window: np.ndarray, breakers: Breakers | None) -> int:
    """How many of the window's last tokens a repeat may span: those after the end of the
    breaker whose head is the most recent one that a tail completes (llama.cpp's rep_limit)."""
    n = window.size
    if breakers is None or not n:
        return n
    single = np.flatnonzero(breakers.single[window])
    first = int(single[-1]) if single.size else 0
    heads = first + np.flatnonzero(breakers.head[window[first:]])
    # a breaker by itself always ends the search: only heads after it need their tails checked
    for at in heads[::-1].tolist():
        longest = breakers.longest_tail(window, at)
        if longest >= 0:
            return n - 1 - at - longest
    return n


def repeat_lengths(window, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The tokens that would extend a repeat of the window's end, each with its longest repeat.

    For each position p before the last, the repeat there is the longest run ending at p that
    equals the window's last tokens (it may overlap them), at most `limit` long; the token at
    p + 1 follows it. Returns (those tokens, each token's longest repeat), each token once.
    """
    h = np.asarray(window, dtype=np.intp)
    last = h.size - 1
    limit = last if limit is None else min(limit, last)
    lengths = np.zeros(max(last, 0), dtype=np.intp)
    at = np.flatnonzero(h[:last] == h[last]) if last > 0 else np.empty(0, np.intp)
    k = 1
    while at.size and k <= limit:  # `at`: the positions whose repeat is at least k long
        lengths[at] = k
        at = at[at >= k]
        at = at[h[at - k] == h[last - k]]
        k += 1
    found = np.flatnonzero(lengths)
    if not found.size:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    tokens, runs = h[found + 1], lengths[found]
    order = np.lexsort((-runs, tokens))  # by token, longest repeat first
    tokens, runs = tokens[order], runs[order]
    first = np.concatenate(([True], tokens[1:] != tokens[:-1]))
    return tokens[first], runs[first]


def max_exponent(base: float) -> int | None:
    """llama.cpp's clamp on the exponent, where base ** it nears float32's maximum (None: base
    1, no clamp): 88.72 / ln(base) in float32, truncated. ln is the double one rounded to
    float32, where llama.cpp calls the C library's logf (see the module's docstring)."""
    b = np.float32(base)
    if not b > np.float32(1.000001):
        return None
    return int(FLOAT_MAX_LOG / np.float32(math.log(b)))


def dry_penalty(row: np.ndarray, history, multiplier: float, base: float, allowed_length: int,
                breakers: Breakers | None = None, last_n: int | None = None) -> np.ndarray:
    """Row less DRY's penalty (see the module's docstring), over the history's last `last_n`
    tokens (None: all; 0: off, as in llama.cpp)."""
    if multiplier <= 0 or last_n == 0:
        return row
    window = np.asarray(history if last_n is None else history[-last_n:], dtype=np.intp)
    limit = repeat_limit(window, breakers)
    if window.size <= allowed_length or limit < allowed_length:
        return row
    clamp = max_exponent(base)
    if clamp is not None:  # past the clamp every length is penalized alike
        limit = min(limit, allowed_length + clamp)
    elif np.float32(base) == 1:  # base 1: every length past allowed_length costs the same
        limit = allowed_length
    tokens, runs = repeat_lengths(window, limit)
    keep = (runs >= allowed_length) & (tokens < row.size)
    if breakers is not None:  # a breaker by itself is never penalized
        keep &= ~breakers.single[np.minimum(tokens, breakers.single.size - 1)]
    if not keep.any():
        return row
    tokens, runs = tokens[keep], runs[keep]
    exponents = runs - allowed_length
    if clamp is not None:
        exponents = np.minimum(exponents, clamp)
    # in double, then rounded to float32 (inf past float32's range), as llama.cpp does
    m, b = float(np.float32(multiplier)), float(np.float32(base))
    penalty = np.array([m * math.pow(b, e) for e in exponents.tolist()], dtype=np.float64)
    out = np.array(row, dtype=np.float32)
    with np.errstate(over="ignore"):
        out[tokens] -= penalty.astype(np.float32)
    return out


def penalize(row: np.ndarray, history, settings, breakers: Breakers | None = None,
             last_n: int | None = None) -> np.ndarray:
    """Every penalty `settings` (a SamplingSettings) turns on, applied to one row; DRY looks at
    the history's last `last_n` tokens (None: all of them)."""
    if not len(history) or not settings.penalized:
        return row
    if settings.presence_penalty or settings.frequency_penalty:
        row = occurrence_penalty(row, history, settings.presence_penalty,
                                 settings.frequency_penalty)
    if settings.dry_multiplier > 0:
        row = dry_penalty(row, history, settings.dry_multiplier, settings.dry_base,
                          settings.dry_allowed_length, breakers, last_n)
    return row

"""GenARM guidance in pure NumPy.

Contract: every function takes and returns plain float32 arrays and knows nothing of llama.cpp.
The guided next-token scores are

    guided = log_softmax(base) + sum_i alpha_i * log_softmax(arm_i)      (+ a constant per row)

over the vocabulary range that base and ARMs share, so that softmax(guided) is exactly
p_base * prod_i p_arm_i ** alpha_i (renormalised). Each log_softmax is its model's logits less
one number per row (its log-sum-exp over its own full vocabulary), so the sum differs from
base + sum_i alpha_i * arm_i by a constant per row only: the engine adds raw logits, each ARM's
with `add_weighted`.
softmax, argmax, top-k, top-p and min-p are all blind to the constant, and skipping the two
log-sum-exps saves most of the per-token NumPy time. `log_softmax(guided)` gives the normalised
guided log-probabilities when they are wanted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, stable for large or -inf logits."""
    shifted = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=-1, keepdims=True)
    shifted -= np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return shifted


def common_vocab_size(sizes: Sequence[int]) -> int:
    """The shared range [0, n) of several vocabularies that agree on it (padding differs)."""
    if not sizes:
        raise ValueError("no vocabularies given")
    return int(min(sizes))


def first_token_mismatch(base_tokens: Sequence[str], arm_tokens: Sequence[str]) -> int | None:
    """The first id below the common size where the two token lists differ, or None."""
    n = min(len(base_tokens), len(arm_tokens))
    for i in range(n):
        if base_tokens[i] != arm_tokens[i]:
            return i
    return None


def add_weighted(guided: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                 logits: np.ndarray) -> None:
    """guided[rows[j]] += weights[j] * logits[j] over guided's vocabulary, in place.

    One ARM's contribution when only some rows use it (each row its own weight); `logits` holds
    the ARM's rows for `rows` only, and may be longer than guided's (padding is left out).
    """
    n = guided.shape[-1]
    scaled = np.asarray(weights, dtype=np.float32)[:, None] * logits[:, :n]
    if rows.size == guided.shape[0]:  # every row, in order: no gather/scatter copy
        guided += scaled
    else:
        guided[rows] += scaled

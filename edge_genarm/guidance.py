"""GenARM guidance in pure NumPy.

Contract: every function takes and returns plain float32 arrays and knows nothing of llama.cpp.
The guided next-token log-probabilities are

    guided = log_softmax(base) + sum_i alpha_i * log_softmax(arm_i)

over the vocabulary range that base and ARMs share, so that softmax(guided) is exactly
p_base * prod_i p_arm_i ** alpha_i (renormalised). Each model is normalised over its own full
vocabulary first (that is its distribution) and then sliced to the common range.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _shift_and_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x - max, log(sum(exp(x - max)))) over the last axis; shifting first keeps precision."""
    shifted = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=-1, keepdims=True)
    return shifted, np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, stable for large or -inf logits."""
    shifted, lse = _shift_and_lse(logits)
    shifted -= lse
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


def combine(base_logits: np.ndarray, arm_logits: Sequence[np.ndarray],
            alphas: Sequence[float], n_vocab: int | None = None) -> np.ndarray:
    """Guided log-probs (unnormalised) over the common vocabulary.

    `base_logits` and each of `arm_logits` are raw logits, 1-D (one position) or 2-D (one row per
    sequence); ARMs with alpha 0 may be left out by the caller, and contribute nothing here either.
    """
    if len(arm_logits) != len(alphas):
        raise ValueError(f"{len(arm_logits)} ARM logit arrays but {len(alphas)} alphas")
    sizes = [base_logits.shape[-1]] + [a.shape[-1] for a in arm_logits]
    n = common_vocab_size(sizes) if n_vocab is None else n_vocab
    # One output array updated in place: this runs once per token on ~50k-entry rows.
    guided = log_softmax(base_logits)[..., :n]
    for logits, alpha in zip(arm_logits, alphas):
        if alpha != 0.0:
            shifted, lse = _shift_and_lse(logits)
            weight = np.float32(alpha)
            guided += weight * shifted[..., :n]
            guided -= weight * lse
    return guided

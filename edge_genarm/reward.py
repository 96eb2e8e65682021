"""Scalar reward models on llama.cpp, and tokenwise guidance with them (PARGS, ARGS).

Contract:
- A reward model is a GGUF causal LM (a full model, or a LoRA adapter of the base) whose metadata
  holds a linear head: `reward.head.weight` (n_embd floats) and `reward.head.bias` (one float),
  and `reward.objective` ("partial-bt": trained on every prefix, for PARGS; "full-bt": on whole
  answers, for ARGS and best-of-N). `read_head(path)` returns the `RewardHead` or raises
  `ModelFileError` naming what is missing. r(tokens) = head(final-norm hidden state of the last
  token), the hidden state a transformers score head reads.
- `RewardModel(head, n_seq, k, model)` is the head and the candidates' bookkeeping; its context
  (made with `ContextSettings.hidden`, `context_settings`) is the engine's, which steps it:
  `Engine.candidate_rewards` and `Engine.sequence_rewards`. Sequence ids below n_seq are the
  engine's own sequences; each has k candidate ids of its own above them (`candidate_id`).
  `fork` records a sequence's candidates, `chosen` names the one the sequence went on with
  (its cell becomes the sequence's own: no decode again), `drop` forgets them.
- `tokenwise_scores(scores, candidates, rewards, weight)` is pure NumPy: a row that is -inf
  except at the candidates, where it is scores + weight * rewards. With log-probs as scores
  (PARGS) softmax of the row is PARGS's tokenwise policy; with raw logits, ARGS's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence as Seq

import numpy as np

from .config import MAX_CANDIDATES
from .errors import ModelFileError, UserError
from .gguf_file import inspect_gguf
from .llama import ContextSettings, Model

if TYPE_CHECKING:
    import gguf

HEAD_WEIGHT = "reward.head.weight"
HEAD_BIAS = "reward.head.bias"
OBJECTIVE = "reward.objective"
OBJECTIVES = ("partial-bt", "full-bt")
LLAMA_MAX_SEQ = 256  # llama.cpp's most sequence ids in one context (llama-cparams.h)


@dataclass(frozen=True)
class RewardHead:
    weight: np.ndarray  # (n_embd,) float32
    bias: float
    objective: str

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """Rewards of hidden-state rows (rows x n_embd), in float64."""
        return np.asarray(hidden, dtype=np.float64) @ self.weight.astype(np.float64) + self.bias


def read_head(path: str | Path) -> RewardHead:
    """The reward head stored in a GGUF's metadata (read with ggml's own parser, as every
    GGUF header is: `gguf_file.inspect_gguf`)."""
    header = inspect_gguf(path)
    weight, bias = header.floats.get(HEAD_WEIGHT), header.floats.get(HEAD_BIAS)
    if not isinstance(weight, tuple) or not isinstance(bias, float):
        raise ModelFileError(
            f"{path} has no reward head ({HEAD_WEIGHT}, {HEAD_BIAS}); a reward model is made by "
            "`edge-genarm train --objective partial-bt|full-bt`")
    objective = header.strings.get(OBJECTIVE, "full-bt")
    return RewardHead(np.asarray(weight, dtype=np.float32), bias, objective)


def head_metadata(writer: gguf.GGUFWriter, weight: np.ndarray, bias: float,
                  objective: str) -> None:
    """Write a reward head into a GGUF being written (the inverse of read_head)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    writer.add_array(HEAD_WEIGHT, [float(x) for x in np.asarray(weight, np.float32).ravel()])
    writer.add_float32(HEAD_BIAS, float(bias))
    writer.add_string(OBJECTIVE, objective)


def context_settings(settings: ContextSettings, k: int) -> ContextSettings:
    """A reward model's context beside an engine of `settings`: hidden states out, k candidate
    sequence ids (and cells) per sequence; refuses what llama.cpp could not hold."""
    n = settings.n_seq_max
    check_candidates(k)
    if n * (1 + k) > LLAMA_MAX_SEQ:
        raise UserError(f"{n} parallel sequences with {k} candidates each need {n * (1 + k)} "
                        f"sequence ids; llama.cpp has {LLAMA_MAX_SEQ}: lower --n-parallel or "
                        "--candidates")
    # every token of a batch comes out (hidden state and logits): a batch of one step's
    # candidates, not llama.cpp's 512 rows of vocabulary-wide logits
    return replace(settings, hidden=True, n_seq_max=n * (1 + k), n_cells=settings.cells + n * k,
                   n_batch=max(64, n * k), n_logits=1)


def check_candidates(k: int) -> None:
    """The most candidates a reward model's context is made for (--candidates)."""
    if not 1 <= k <= MAX_CANDIDATES:
        raise UserError(f"--candidates must be between 1 and {MAX_CANDIDATES}, got {k}")


def tokenwise_scores(scores: np.ndarray, candidates: np.ndarray, rewards: np.ndarray,
                     weight: float) -> np.ndarray:
    """-inf everywhere but the candidates, which get scores[c] + weight * rewards."""
    out = np.full(scores.shape[-1], -np.inf, dtype=np.float32)
    out[candidates] = scores[candidates] + np.float32(weight) * rewards.astype(np.float32)
    return out


def top_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring token ids, best first (ties: the lower id first)."""
    k = min(k, scores.size)
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.lexsort((best, -scores[best]))]


class RewardModel:
    """A reward model's head and its candidates' bookkeeping; the engine owns and steps its
    context. Sequence ids below n_seq are the engine's sequences; each has k candidate ids."""

    def __init__(self, head: RewardHead, n_seq: int, k: int, model: Model):
        if head.weight.size != model.n_embd:
            raise ModelFileError(
                f"the reward head has {head.weight.size} weights but {model.path} has "
                f"hidden states of {model.n_embd}; the head belongs to another model")
        self.head, self.n_seq, self.k = head, n_seq, k
        self.batched = True  # False: one decode per candidate (the PARGS authors' way), to compare
        self._forked: dict[int, tuple[int, list[int]]] = {}  # seq id -> (position, tokens)

    def candidate_id(self, seq_id: int, j: int) -> int:
        return self.n_seq + seq_id * self.k + j

    def fork(self, seq_id: int, position: int, tokens: Seq[int]) -> list[int]:
        """Record a sequence's candidates at `position`; their candidate ids, in order."""
        if not 1 <= len(tokens) <= self.k:  # requests are checked at submit (policy.py)
            raise ValueError(f"{len(tokens)} candidates; this reward model was loaded for 1 "
                             f"to {self.k}")
        self._forked[seq_id] = (position, [int(t) for t in tokens])
        return [self.candidate_id(seq_id, j) for j in range(len(tokens))]

    def chosen(self, seq_id: int, tokens: Seq[int], held: int) -> int | None:
        """The candidate id a sequence went on with, if its cell can become the sequence's own:
        the candidates were forked where the sequence's cache ends (`held`) and it goes on with
        one of them. The sequence's candidates are forgotten either way (see `drop`)."""
        forked = self._forked.get(seq_id)
        if forked is None:
            return None
        pos, toks = forked
        if held == pos and len(tokens) > pos and tokens[pos] in toks:
            return self.candidate_id(seq_id, toks.index(tokens[pos]))
        return None

    def drop(self, seq_id: int) -> list[int]:
        """Forget a sequence's candidates; the candidate ids whose cells are to be removed."""
        if self._forked.pop(seq_id, None) is None:
            return []
        return [self.candidate_id(seq_id, j) for j in range(self.k)]

    @staticmethod
    def split(rewards: np.ndarray, tokens: Seq[Seq[int]]) -> list[np.ndarray]:
        """One flat array of candidates' rewards cut into one array per sequence."""
        out, start = [], 0
        for toks in tokens:
            out.append(rewards[start:start + len(toks)])
            start += len(toks)
        return out

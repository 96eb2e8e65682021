"""Scalar reward models on llama.cpp, and tokenwise guidance with them (PARGS, ARGS).

Contract:
- A reward model is a GGUF causal LM (a full model, or a LoRA adapter of the base) whose metadata
  holds a linear head: `reward.head.weight` (n_embd floats) and `reward.head.bias` (one float),
  and `reward.objective` ("partial-bt": trained on every prefix, for PARGS; "full-bt": on whole
  answers, for ARGS and best-of-N). `read_head(path)` returns the `RewardHead` or raises
  `ModelFileError` naming what is missing. r(tokens) = head(final-norm hidden state of the last
  token), the hidden state a transformers score head reads.
- `RewardModel(context, head, n_seq, k)` runs on a context made with `ContextSettings.hidden`.
  Sequence ids below n_seq are the engine's own sequences; each has k candidate ids of its own
  above them. `candidates(seqs, tokens)` brings each sequence's prefix up to date, forks it into
  one candidate sequence per token (llama_memory_seq_cp: cells shared, nothing copied), decodes
  every candidate of every sequence in one batch, and returns r(prefix + token) per candidate.
  At the next call the candidate that the sequence went on with is kept as its next cell (no
  decode again) and the other candidates are dropped.
- `sequence_rewards(seqs)` is r of each whole sequence (best-of-N's judge).
- `tokenwise_scores(scores, candidates, rewards, weight)` is pure NumPy: a row that is -inf
  except at the candidates, where it is scores + weight * rewards. With log-probs as scores
  (PARGS) softmax of the row is PARGS's tokenwise policy; with raw logits, ARGS's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence as Seq

import numpy as np

from .errors import ModelFileError, UserError
from .gguf_file import inspect_gguf
from .llama import Context, ContextSettings

if TYPE_CHECKING:
    import gguf

HEAD_WEIGHT = "reward.head.weight"
HEAD_BIAS = "reward.head.bias"
OBJECTIVE = "reward.objective"
OBJECTIVES = ("partial-bt", "full-bt")
MAX_CANDIDATES = 64
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
    """A reward model's context: its sequences mirror the engine's; candidates fork from them."""

    def __init__(self, context: Context, head: RewardHead, n_seq: int, k: int):
        if head.weight.size != context.model.n_embd:
            raise ModelFileError(
                f"the reward head has {head.weight.size} weights but {context.model.path} has "
                f"hidden states of {context.model.n_embd}; the head belongs to another model")
        self.context, self.head, self.n_seq, self.k = context, head, n_seq, k
        self.batched = True  # False: one decode per candidate (the PARGS authors' way), to compare
        self._forked: dict[int, tuple[int, list[int]]] = {}  # seq id -> (position, tokens)

    def candidate_id(self, seq_id: int, j: int) -> int:
        return self.n_seq + seq_id * self.k + j

    def forget(self, seq_id: int) -> None:
        """Drop a sequence's candidates (its own cells are the engine's to remove)."""
        if self._forked.pop(seq_id, None) is not None:
            for j in range(self.k):
                self.context.seq_remove(self.candidate_id(seq_id, j))

    def candidates(self, seqs: Seq, tokens: Seq[np.ndarray]) -> list[np.ndarray]:
        """r(sequence + t) for every t of tokens[i], per sequence, from one decode of them all."""
        ctx = self.context
        self._catch_up(seqs)
        entries = []
        for seq, toks in zip(seqs, tokens):
            if not 1 <= len(toks) <= self.k:  # requests are checked at submit (policy.py)
                raise ValueError(f"{len(toks)} candidates; this reward model was loaded for 1 "
                                 f"to {self.k}")
            end = len(seq.tokens)
            for j, tok in enumerate(toks):
                ctx.seq_copy(seq.seq_id, self.candidate_id(seq.seq_id, j), 0, end)
                entries.append((self.candidate_id(seq.seq_id, j), [int(tok)], end))
            self._forked[seq.seq_id] = (end, [int(t) for t in toks])
        if self.batched:
            rewards = self.head(ctx.decode(entries))
        else:
            rewards = np.concatenate([self.head(ctx.decode([e])) for e in entries])
        out, start = [], 0
        for toks in tokens:
            out.append(rewards[start:start + len(toks)])
            start += len(toks)
        return out

    def sequence_rewards(self, seqs: Seq) -> np.ndarray:
        """r of each whole sequence (its last token's hidden state)."""
        ctx = self.context
        entries = []
        for seq in seqs:
            self._keep_chosen(seq)
            start = min(seq.behind(ctx), len(seq.tokens) - 1)  # the last token is read again
            ctx.seq_remove(seq.seq_id, start, -1)
            entries.append((seq.seq_id, seq.tokens[start:], start))
        rewards = self.head(ctx.decode(entries))
        for seq in seqs:
            seq.holds(ctx, len(seq.tokens))
        return rewards

    def _keep_chosen(self, seq) -> None:
        """The candidate a sequence went on with becomes its own cell; the others go."""
        ctx = self.context
        forked = self._forked.get(seq.seq_id)
        if forked is None:
            return
        pos, toks = forked
        if seq.behind(ctx) == pos and len(seq.tokens) > pos and seq.tokens[pos] in toks:
            ctx.seq_copy(self.candidate_id(seq.seq_id, toks.index(seq.tokens[pos])), seq.seq_id,
                         pos, pos + 1)
            seq.holds(ctx, pos + 1)
        self.forget(seq.seq_id)

    def _catch_up(self, seqs: Seq) -> None:
        ctx = self.context
        entries = []
        for seq in seqs:
            self._keep_chosen(seq)
            held = seq.behind(ctx)
            if held < len(seq.tokens):
                entries.append((seq.seq_id, seq.tokens[held:], held))
        if entries:
            ctx.decode(entries)  # the prefix's cells; its rows are not read
        for seq in seqs:
            seq.holds(ctx, len(seq.tokens))

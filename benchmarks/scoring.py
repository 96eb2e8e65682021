"""Teacher-forced log-probs of given answers under a model, for the benchmarks that score text.

Contract: `answer_logprobs(engine, prompts, answers, k)` feeds each prompt's ids, then its
answer's ids one at a time, `k` sequences decoded together, and returns per answer a float64
array of log p(answer[t] | prompt, answer[:t]) for every t, from the engine's base model alone
(every ARM at alpha 0 meanwhile). A prompt must be non-empty; an answer may not be.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_genarm import guidance  # noqa: E402
from edge_genarm.engine import Engine  # noqa: E402


def answer_logprobs(engine: Engine, prompts: list[list[int]], answers: list[list[int]],
                    k: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    with engine.alphas_zeroed():
        for first in range(0, len(prompts), k):
            chunk = list(range(first, min(first + k, len(prompts))))
            seqs = {i: engine.new_sequence() for i in chunk}
            scores = {i: np.empty(len(answers[i])) for i in chunk}
            rows = engine.advance([seqs[i] for i in chunk], [prompts[i] for i in chunk])
            live, t = chunk, 0
            while live:
                rows = rows if rows.ndim == 2 else rows[None]
                for i, row in zip(live, rows):
                    if t < len(answers[i]):
                        scores[i][t] = float(guidance.log_softmax(row)[answers[i][t]])
                t += 1
                live = [i for i in live if t < len(answers[i])]
                if live:
                    rows = engine.advance([seqs[i] for i in live],
                                          [[answers[i][t - 1]] for i in live])
            out += [scores[i] for i in chunk]
            for seq in seqs.values():
                engine.release(seq)
    return out

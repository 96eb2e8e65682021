"""Greedy answers, and teacher-forced log-probs of given answers, for the benchmarks that score
text.

Contract: `greedy_answers(engine, texts, weight, max_tokens, stop=(), sampling=GREEDY)` answers
every request (chat template applied) greedily (with `sampling`'s penalties, if any) through one
scheduler, every ARM at `weight`, all requests at once, each ending at a stop string if one is
given, and returns ([(token ids, text) per request], generated tokens/s).
`decode_speed(engine, texts, weight, tokens, sampling=GREEDY)` is the tokens/s of decoding
alone: every request at once (at most the engine's sequences), each exactly `tokens` tokens
(end of generation masked), timed from the step that gives the first tokens, so that
the prompts' prefill is left out. `answer_logprobs(engine, prompts, answers, k)` feeds each
prompt's ids, then its answer's ids one at a time, `k` sequences decoded together, and returns
per answer a float64 array of log p(answer[t] | prompt, answer[:t]) for every t, from the engine's base model alone
(every ARM at alpha 0 meanwhile). A prompt must be non-empty; an answer may not be.
"""

from __future__ import annotations

import time

import numpy as np


from edge_genarm import guidance
from edge_genarm.engine import Engine
from edge_genarm.generation import encode_prompt, run_to_end
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler


GREEDY = SamplingSettings(greedy=True)


def _submit_greedy(scheduler: Scheduler, texts: list[str], weight: float, max_tokens: int,
                   sampling: SamplingSettings, **fields) -> list:
    """Every text as a greedy chat request, every ARM at `weight`: their handles."""
    engine = scheduler.engine
    arms = {a.name: weight for a in engine.arms}
    return [scheduler.submit(Request(tuple(encode_prompt(engine, t)), sampling, max_tokens,
                                     arms=arms, **fields)) for t in texts]


def greedy_answers(engine: Engine, texts: list[str], weight: float,
                   max_tokens: int, stop: tuple[str, ...] = (),
                   sampling: SamplingSettings = GREEDY
                   ) -> tuple[list[tuple[list[int], str]], float]:
    with Scheduler(engine) as scheduler:
        t0 = time.perf_counter()
        handles = _submit_greedy(scheduler, texts, weight, max_tokens, sampling, stop=stop)
        rows = [(r.tokens, r.text) for [r] in run_to_end(scheduler, handles)]
        seconds = time.perf_counter() - t0
    return rows, sum(len(t) for t, _ in rows) / seconds


def decode_speed(engine: Engine, texts: list[str], weight: float, tokens: int,
                 sampling: SamplingSettings = GREEDY) -> float:
    with Scheduler(engine) as scheduler:
        handles = _submit_greedy(scheduler, texts, weight, tokens, sampling, ignore_eos=True)
        t_first, n = 0.0, 0
        for event in scheduler.run(handles):
            if event.token is not None:
                n += 1
                t_first = t_first or time.perf_counter()  # the first step's events: prefill done
        seconds = time.perf_counter() - t_first
    return (n - len(texts)) / seconds


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

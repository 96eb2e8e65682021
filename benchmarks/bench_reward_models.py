"""Does a reward model rank the base's own answers as the objective does? The demo reward models
against AFINN, on the answers best-of-N and tokenwise guidance choose among.

On the held-out demo prompts, the demo preset's base (SmolLM2-135M-Instruct, Q8_0) samples
--samples answers per prompt (T = 1, filters off, at most --max-tokens tokens, the same answers
for every reward model: one seed per prompt). Each reward model scores every whole answer (its
end-of-generation token included when it has one, as `best-of-n` does). Per reward model: the
Pearson correlation of r with the answers' AFINN score over all answers and within each prompt
(the mean over prompts: best-of-N only ever compares answers to one prompt), and the mean AFINN
of the answer that best-of-n keeps among the first n samples, for n = 1 (no choice), 2, 4, ...,
--samples, with the answer AFINN itself would keep as the ceiling.

    python -m benchmarks.bench_reward_models [--prompts 30] [--samples 8] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from edge_genarm.engine import Engine, EngineConfig, RewardSpec
from edge_genarm.generation import encode_prompt, run_to_end
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler

DEMO = ROOT / "edge_genarm" / "demo"  # the shipped reward models
DEMO_DATA = ROOT / "recipes" / "demo"  # the prompts the demo ARMs were not trained on
POLICY = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def sample(engine: Engine, prompts: list[list[int]], n: int, max_tokens: int) -> list[list]:
    """n answers per prompt, as [(tokens with the end-of-generation token, text)] per prompt."""
    with Scheduler(engine) as scheduler:
        handles = [scheduler.submit(Request(tuple(p), POLICY, max_tokens, seed=i, n=n))
                   for i, p in enumerate(prompts)]
        return [[(r.tokens, r.text) for r in answers]
                for answers in run_to_end(scheduler, handles)]


def rewards(engine: Engine, prompt: list[int], answers: list) -> list[float]:
    """r of every answer to one prompt, in one decode of the reward model."""
    seqs = [engine.new_sequence() for _ in answers]
    for seq, (tokens, _) in zip(seqs, answers):
        engine.extend(seq, list(prompt) + tokens)
    out = engine.sequence_rewards(seqs)
    for seq in seqs:
        engine.release(seq)
    return [float(r) for r in out]


def report(name: str, scores: list[list[float]], afinn: list[list[float]], ns: list[int]) -> None:
    flat = np.corrcoef(sum(scores, []), sum(afinn, []))[0, 1]
    # prompts whose answers all have one AFINN score say nothing within the prompt
    varied = [np.corrcoef(r, a)[0, 1] for r, a in zip(scores, afinn)
              if np.ptp(a) > 0 and np.ptp(r) > 0]
    within = statistics.mean(varied) if varied else float("nan")
    kept = [statistics.mean(a[int(np.argmax(r[:n]))] for r, a in zip(scores, afinn)) for n in ns]
    print(f"| {name} | {flat:.3f} | {within:.3f} | " + " | ".join(f"{k:.2f}" for k in kept) + " |",
          flush=True)


def main() -> None:
    from afinn import Afinn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    reg = Registry.load()
    base = reg.resolve("@smollm2-q8")
    texts = (DEMO_DATA / "held_out_prompts.txt").read_text().splitlines()[:args.prompts]
    models = {"partial-BT (positive_rm)": DEMO / "positive_rm.gguf",
              "full-BT (positive_rm_full)": DEMO / "positive_rm_full.gguf"}
    settings = ContextSettings(n_ctx=512, n_seq_max=max(16, args.samples))
    ns = [n for n in (1, 2, 4, 8, 16, 32) if n < args.samples] + [args.samples]
    print_header()
    answers, scores = None, {}
    for name, path in models.items():
        with Engine.load(EngineConfig(base, [], settings, reward=RewardSpec(path, 1))) as engine:
            prompts = [encode_prompt(engine, t) for t in texts]
            if answers is None:  # sampled once: every reward model judges the same answers
                answers = sample(engine, prompts, args.samples, args.max_tokens)
                ended = sum(engine.model.is_eog(t[-1]) for a in answers for t, _ in a if t)
            scores[name] = [rewards(engine, p, a) for p, a in zip(prompts, answers)]
    scorer = Afinn()
    afinn = [[scorer.score(text) for _, text in a] for a in answers]
    print(f"{len(texts)} held-out demo prompts, {args.samples} answers each (T = 1, filters off, "
          f"at most {args.max_tokens} tokens): {ended} of {len(texts) * args.samples} ended "
          f"before the limit; AFINN of all answers {statistics.mean(sum(afinn, [])):.2f}")
    print("| reward model | r against AFINN, all answers | within a prompt (mean) | "
          + " | ".join(f"best-of-{n} AFINN" for n in ns) + " |")
    print("|---|---|---|" + "---|" * len(ns))
    for name in models:
        report(name, scores[name], afinn, ns)
    report("AFINN itself (the ceiling)", afinn, afinn, ns)


if __name__ == "__main__":
    main()

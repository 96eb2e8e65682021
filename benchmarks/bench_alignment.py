"""Does the demo guidance do what it says? Measured on held-out prompts training never saw.

For the demo preset (SmolLM2-135M-Instruct with the `positive` and `concise` LoRA ARMs) this
generates an answer to each held-out prompt at each setting of the two alphas and prints, per
setting: the mean AFINN sentiment score, the mean answer length in words, and the base model's
mean log-prob per token of the answers (a coherence check: guidance that broke the language
would send it down). Settings: positive in 0, 0.5, 1, 2 (concise 0), concise in 0, 0.5, 1, 2
(positive 0), and the 3 x 3 grid {0, 1, 2} x {0, 1, 2}, drawn as docs/tradeoff.png.

    python benchmarks/bench_alignment.py [--prompts 30] [--max-tokens 64] [--n-parallel 8]

Answers are generated K = --n-parallel at a time (batch generation, a seed per prompt).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_genarm import guidance  # noqa: E402
from edge_genarm.engine import ArmSpec, Engine, EngineConfig  # noqa: E402
from edge_genarm.batch import Item, run_batch  # noqa: E402
from edge_genarm.generation import encode_prompt  # noqa: E402
from edge_genarm.llama import ContextSettings  # noqa: E402
from edge_genarm.options import GenerationOptions  # noqa: E402
from edge_genarm.registry import Registry  # noqa: E402
from edge_genarm.sampling import SamplingSettings  # noqa: E402


def settings() -> list[tuple[float, float]]:
    grid = [(p, c) for p in (0.0, 1.0, 2.0) for c in (0.0, 1.0, 2.0)]
    return sorted(set(grid + [(0.5, 0.0), (0.0, 0.5)]))


def base_logprobs(engine: Engine, prompts: list[list[int]], answers: list[list[int]],
                  k: int) -> list[float]:
    """Mean log-prob per token of each answer under the base model alone, k sequences at once."""
    out = []
    with engine.alphas_zeroed():
        for first in range(0, len(prompts), k):
            chunk = list(range(first, min(first + k, len(prompts))))
            seqs = {i: engine.new_sequence(j) for j, i in enumerate(chunk)}
            totals = {i: 0.0 for i in chunk}
            rows = engine.advance([seqs[i] for i in chunk], [prompts[i] for i in chunk])
            live, t = chunk, 0
            while True:
                rows = rows if rows.ndim == 2 else rows[None]
                for i, row in zip(live, rows):
                    totals[i] += float(guidance.log_softmax(row)[answers[i][t]])
                t += 1
                live = [i for i in live if t < len(answers[i])]
                if not live:
                    break
                rows = engine.advance([seqs[i] for i in live], [[answers[i][t - 1]] for i in live])
            out += [totals[i] / len(answers[i]) for i in chunk]
    return out


def main() -> None:
    from afinn import Afinn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-parallel", type=int, default=8)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "tradeoff.png")
    ap.add_argument("--settings", help="only these (positive:concise) pairs, e.g. 0:0,0:1,0:2 "
                    "(no plot is drawn)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=GGUF",
                    help="try another ARM file for the preset's ARM NAME (a candidate build)")
    args = ap.parse_args()
    chosen = settings()
    if args.settings:
        chosen = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    swap = dict(a.split("=", 1) for a in args.arm)
    reg = Registry.load()
    preset = reg.preset("demo")
    held = (ROOT / "edge_genarm" / "demo" / "held_out_prompts.txt").read_text().split("\n")
    held = [p for p in held if p][: args.prompts]
    arms = [ArmSpec(swap.get(a.name) or reg.resolve(a.model), 0.0, a.name) for a in preset.arms]
    base = reg.resolve(preset.base)
    context = ContextSettings(n_ctx=args.max_tokens + 128, n_seq_max=args.n_parallel)
    opts = GenerationOptions(base=base, arms=arms, max_tokens=args.max_tokens, seed=1000,
                             sampling=SamplingSettings(temperature=0.7, top_k=40, top_p=0.95,
                                                       min_p=0.05), context=context)
    afinn = Afinn()
    rows = {}
    t0 = time.time()
    print("| alpha positive | alpha concise | AFINN | words | base log-prob |")
    print("|---|---|---|---|---|")
    with Engine.load(EngineConfig(base, arms, context)) as engine:
        by_name = {a.name: a for a in engine.arms}
        items = [Item(i, i, prompt=p) for i, p in enumerate(held)]
        encoded = [encode_prompt(engine, p) for p in held]
        for pos, con in chosen:
            by_name["positive"].alpha, by_name["concise"].alpha = pos, con
            done: dict[int, dict] = {}
            run_batch(engine, items, opts, opts.seed, args.n_parallel,
                      lambda r: done.__setitem__(r["id"], r))
            texts = [done[i]["text"] for i in range(len(held))]
            answers = [[t for t in done[i]["tokens"] if not engine.model.is_eog(t)] or
                       done[i]["tokens"] for i in range(len(held))]
            coherence = base_logprobs(engine, encoded, answers, args.n_parallel)
            rows[(pos, con)] = (np.mean([afinn.score(t) for t in texts]),
                                np.mean([len(t.split()) for t in texts]), np.mean(coherence))
            print(f"| {pos:g} | {con:g} | {rows[(pos, con)][0]:.2f} | {rows[(pos, con)][1]:.1f} "
                  f"| {rows[(pos, con)][2]:.2f} |", flush=True)
    print(f"\n{len(held)} held-out prompts, {len(rows)} settings, {time.time() - t0:.0f} s")
    if not args.settings:
        plot(rows, args.plot)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (pos, con), (score, length, _) in sorted(rows.items()):
        if pos in (0, 1, 2) and con in (0, 1, 2):
            ax.scatter(length, score, s=40 + 40 * con, c=[[pos / 2, 0.2, 1 - pos / 2]])
            ax.annotate(f"({pos:g}, {con:g})", (length, score), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean answer length (words)  <- concise")
    ax.set_ylabel("mean AFINN score  -> positive")
    ax.set_title("Demo ARMs on held-out prompts: (alpha positive, alpha concise)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

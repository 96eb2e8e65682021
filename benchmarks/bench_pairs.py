"""How far the base alone already separates the demo preference pairs, before any training.

For each demo objective (recipes/demo/<objective>_pairs.jsonl) the pairs are encoded exactly
as `edge-genarm train` encodes them for the demo build (the GGUF's chat template for the prompt,
the response plus end-of-turn, cut at the build's --max-length), and the shipped Q4_1 SmolLM2
(`@smollm2`, the base the demo ARMs train on) scores every chosen and rejected response. Printed
per objective: the margin log p(chosen) - log p(rejected) with summed token log-probs (the loss's
default) and with their mean per token (`--length-norm`): its median, its smallest value, how many
pairs the base already prefers the chosen answer in, and the mean loss -log sigmoid(beta * margin)
at beta 0.1 (summed) or 1 (per token) before training.

    python -m benchmarks.bench_pairs [--objectives concise,positive] [--threads N]
                                     [--max-length N]   # instead of the build's cut
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from benchmarks.scoring import answer_logprobs
from recipes.demo.build import TRAINING
from edge_genarm.engine import Engine, EngineConfig
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import resolve_model
from edge_genarm.train.base import gguf_encoder
from edge_genarm.train.data import load_pairs

K = 8  # sequences decoded together


def max_length(objective: str) -> int:
    options = TRAINING[objective]
    return int(options[options.index("--max-length") + 1])


def margins(engine: Engine, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(summed margin, per-token margin, chosen/rejected token counts) per pair."""
    prompts = [p.prompt for p in pairs] * 2
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = answer_logprobs(engine, prompts, answers, K)
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    summed = np.array([c.sum() - r.sum() for c, r in zip(chosen, rejected)])
    mean = np.array([c.mean() - r.mean() for c, r in zip(chosen, rejected)])
    lengths = np.array([[len(c), len(r)] for c, r in zip(chosen, rejected)])
    return summed, mean, lengths


def loss(margin: np.ndarray, beta: float) -> float:
    return float(np.mean(np.logaddexp(0.0, -beta * margin)))  # -log sigmoid(beta * margin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objectives", default="concise,positive")
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    ap.add_argument("--max-length", type=int, default=0,
                    help="cut prompt plus response at N tokens (0: the demo build's setting)")
    ap.add_argument("--pairs", type=int, default=0, help="the first N pairs only (0: all)")
    args = ap.parse_args()
    print_header()
    base = resolve_model("@smollm2")
    encoder = gguf_encoder(base)
    print(f"base: {base.name} (@smollm2); pairs encoded as `edge-genarm train` encodes them\n")
    print("| pairs | n | tokens chosen / rejected (mean) | summed margin, median nats | "
          "smallest | chosen preferred (summed) | loss at beta 0.1 | per-token margin, median "
          "| chosen preferred (per token) | loss at beta 1, per token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    longest = args.max_length or max(max_length(o) for o in TRAINING)
    settings = ContextSettings(n_ctx=longest, n_seq_max=K, n_threads=args.threads)
    with Engine.load(EngineConfig(base, [], settings)) as engine:
        for objective in args.objectives.split(","):
            path = ROOT / "recipes" / "demo" / f"{objective}_pairs.jsonl"
            cut = args.max_length or max_length(objective)
            pairs, skipped = load_pairs(path, encoder, cut)
            pairs = pairs[:args.pairs or None]
            summed, mean, lengths = margins(engine, pairs)
            n = len(pairs)
            print(f"| {objective} (max length {cut}, {len(skipped)} skipped) | "
                  f"{n} | {lengths[:, 0].mean():.0f} / {lengths[:, 1].mean():.0f} | "
                  f"{statistics.median(summed):.1f} | {summed.min():.1f} | "
                  f"{(summed > 0).sum()} of {n} ({100 * (summed > 0).mean():.0f} %) | "
                  f"{loss(summed, 0.1):.4f} | {statistics.median(mean):.3f} | "
                  f"{(mean > 0).sum()} of {n} ({100 * (mean > 0).mean():.0f} %) | "
                  f"{loss(mean, 1.0):.3f} |", flush=True)


if __name__ == "__main__":
    main()

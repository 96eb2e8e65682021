"""GenARM against reward-guided decoding with a scalar reward model (PARGS, PARGS-G, ARGS,
best-of-N), on the demo objective `positive`, side by side in one run.

On the held-out demo prompts, with the demo preset's base (SmolLM2-135M-Instruct, Q8_0): the
unguided base; GenARM with the demo ARM `positive` at --alphas; PARGS (sampled) and PARGS-G
(greedy) with the partial-BT reward model `positive_rm.gguf` at --weights; ARGS (greedy) with
the full-BT reward model `positive_rm_full.gguf`; best-of-N (N in --samples) with the full-BT
one. Sampled methods sample at T = 1 with every filter off (each method's own policy); all
requests of a setting decode together (--parallel sequences; best-of-N's N samples count).
Columns: the objective (mean AFINN sentiment score of the answers, as the demo evidence), the
base's own log-prob per token of the answers (coherence), distinct-1/2 (diversity: distinct
n-grams over all n-grams of the setting's answers), and generated tokens/s (best-of-N: the
returned answers' tokens over the time of all samples). A plot of objective against tokens/s
goes to --plot.

Then PARGS with the k candidates of every step scored in one batched decode against the same
method scoring them with k decodes (the authors' way), k = --candidates, greedy, on the first
--compare-prompts prompts decoded together, each way twice and interleaved (the median
counts), the same answers (the tokens are compared).

    python -m benchmarks.bench_rgtg [--prompts 30] [--max-tokens 96] [--plot docs/rgtg.png]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from benchmarks.scoring import answer_logprobs
from edge_genarm.engine import ArmSpec, Engine, EngineConfig, RewardSpec
from edge_genarm.generation import encode_prompt, run_to_end
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler

DEMO = ROOT / "edge_genarm" / "demo"  # the shipped reward models
DEMO_DATA = ROOT / "recipes" / "demo"  # the prompts the demo ARMs were not trained on
POLICY = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
GREEDY = SamplingSettings(greedy=True)


def run_setting(engine: Engine, prompts: list[list[int]], request: dict, max_tokens: int):
    """Every prompt answered in one scheduler: (answers' token lists, their texts, generated
    tokens/s)."""
    with Scheduler(engine) as scheduler:
        t0 = time.perf_counter()
        handles = [scheduler.submit(Request(tuple(p), max_tokens=max_tokens, seed=i, **request))
                   for i, p in enumerate(prompts)]
        results = [r for [r] in run_to_end(scheduler, handles)]
        seconds = time.perf_counter() - t0
    answers = [[t for t in r.tokens if not engine.model.is_eog(t)] for r in results]
    return answers, [r.text for r in results], sum(map(len, answers)) / seconds


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def measure(name: str, engine: Engine, prompts, request: dict, args, afinn, table: list) -> list:
    answers, texts, speed = run_setting(engine, prompts, request, args.max_tokens)
    lps = answer_logprobs(engine, prompts, answers, args.parallel)
    row = {"setting": name, "afinn": statistics.mean(afinn.score(t) for t in texts),
           "base_lp": sum(float(lp.sum()) for lp in lps) / max(1, sum(map(len, lps))),
           "d1": distinct(texts, 1), "d2": distinct(texts, 2), "tok_s": speed}
    table.append(row)
    print(f"| {name} | {row['afinn']:.2f} | {row['base_lp']:.3f} | {row['d1']:.3f} | "
          f"{row['d2']:.3f} | {speed:.1f} |", flush=True)
    return answers


def batched_against_sequential(engine: Engine, prompts, args) -> dict:
    """PARGS-G with every step's candidates scored in one decode against one decode per
    candidate, on an engine loaded with `RewardSpec(..., args.candidates)` (where its layers run
    is the caller's EngineConfig); `args` holds candidates, compare_prompts and max_tokens.
    Prints the line and returns its figures."""
    request = dict(sampling=GREEDY, method="pargs", candidates=args.candidates,
                   reward_weight=1.0)
    runs = {}
    prompts = prompts[:args.compare_prompts]
    for batched in (True, False, True, False):  # interleaved: the machine drifts
        engine.reward.batched = batched
        answers, _, speed = run_setting(engine, prompts, request, args.max_tokens)
        runs.setdefault(batched, []).append((answers, speed))
    engine.reward.batched = True
    fast = statistics.median(s for _, s in runs[True])
    slow = statistics.median(s for _, s in runs[False])
    same = sum(a == b for a, b in zip(runs[True][0][0], runs[False][0][0]))
    print(f"\nPARGS-G, k = {args.candidates}, {len(prompts)} prompts: candidates in one decode "
          f"{fast:.1f} tok/s, one decode per candidate {slow:.1f} tok/s: {fast / slow:.2f}x "
          f"(target 1.5x); identical answers {same}/{len(prompts)}")
    return {"candidates": args.candidates, "prompts": len(prompts), "batched_tok_s": fast,
            "sequential_tok_s": slow, "speedup": fast / slow, "identical": same}


def frontier(table: list) -> list[str]:
    """The settings that no other setting matches or beats on both the objective and tokens/s
    (the Pareto frontier), fastest first: for a time budget, the best is on this list."""
    return [r["setting"] for r in sorted(table, key=lambda r: -r["tok_s"])
            if not any(o is not r and o["afinn"] >= r["afinn"] and o["tok_s"] >= r["tok_s"]
                       for o in table)]


def plot(table: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for row in table:
        ax.plot(row["tok_s"], row["afinn"], "o")
        ax.annotate(row["setting"], (row["tok_s"], row["afinn"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel("generated tokens/s ->")
    ax.set_ylabel("mean AFINN score -> positive")
    ax.set_title("Held-out demo prompts: objective against speed, per method", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    from afinn import Afinn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--alphas", default="0.5,1,2")
    ap.add_argument("--weights", default="1,2,4")
    ap.add_argument("--samples", default="4,8")
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=16, help="sequences decoded together (with "
                    "--candidates, at most 256 / (1 + K))")
    ap.add_argument("--compare-prompts", type=int, default=8,
                    help="prompts for batched against sequential scoring (each way run twice)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--reward-model", type=Path, default=DEMO / "positive_rm.gguf",
                    help="the partial-BT reward model (PARGS)")
    ap.add_argument("--reward-model-full", type=Path, default=DEMO / "positive_rm_full.gguf",
                    help="the full-BT reward model (ARGS, best-of-N)")
    args = ap.parse_args()
    reg = Registry.load()
    base = reg.resolve("@smollm2-q8")
    arm = ArmSpec(reg.resolve("@demo-positive"), 0.0, "positive")
    texts = (DEMO_DATA / "held_out_prompts.txt").read_text().splitlines()[:args.prompts]
    # best-of-N's samples decode side by side: N of the parallel sequences per request
    settings = ContextSettings(n_ctx=512, n_seq_max=args.parallel)
    afinn, table = Afinn(), []
    print_header()
    print(f"{len(texts)} held-out demo prompts, at most {args.max_tokens} tokens; sampled "
          "methods at T = 1, filters off")
    print("| setting | AFINN | base log-prob/token | distinct-1 | distinct-2 | tokens/s |")
    print("|---|---|---|---|---|---|")
    rm = RewardSpec(args.reward_model, args.candidates)
    with Engine.load(EngineConfig(base, [arm], settings, reward=rm)) as engine:
        prompts = [encode_prompt(engine, t) for t in texts]
        measure("base", engine, prompts, dict(sampling=POLICY), args, afinn, table)
        for a in args.alphas.split(","):
            measure(f"GenARM alpha {a}", engine, prompts,
                    dict(sampling=POLICY, arms={"positive": float(a)}), args, afinn, table)
        for w in args.weights.split(","):
            for name, sampling in (("PARGS", POLICY), ("PARGS-G", GREEDY)):
                measure(f"{name} w {w}", engine, prompts,
                        dict(sampling=sampling, method="pargs", reward_weight=float(w)), args,
                        afinn, table)
        batched_against_sequential(engine, prompts, args)
    full = RewardSpec(args.reward_model_full, args.candidates)
    with Engine.load(EngineConfig(base, [], settings, reward=full)) as engine:
        prompts = [encode_prompt(engine, t) for t in texts]
        measure("ARGS (greedy) w 1", engine, prompts,
                dict(sampling=GREEDY, method="args", reward_weight=1.0), args, afinn, table)
        for n in args.samples.split(","):
            measure(f"best-of-{n}", engine, prompts,
                    dict(sampling=POLICY, method="best-of-n", samples=int(n)), args, afinn,
                    table)
    genarm = next(r for r in table if r["setting"] == "GenARM alpha 1")
    for row in table:
        if row["setting"].startswith("PARGS w"):
            print(f"{row['setting']}: {row['tok_s'] / genarm['tok_s']:.2f} of GenARM's tokens/s "
                  "(one ARM of the same size)")
    print("objective against speed, the frontier from fastest to most positive: "
          + " > ".join(frontier(table)))
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()

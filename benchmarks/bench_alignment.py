"""Does the demo guidance do what it says? Measured on held-out prompts training never saw.

For the demo preset (SmolLM2-135M-Instruct with the `positive` and `concise` LoRA ARMs) this
answers each held-out prompt at each chosen (alpha positive, alpha concise) setting, once per
seed, and prints per setting the mean and the standard deviation across seeds (of the per-seed
means) of: the mean AFINN sentiment score, the mean answer length in words, AFINN per 100 words,
the base model's mean log-prob per token of the answers, a judge's mean log-prob per token
(Qwen2.5-Coder-0.5B-Instruct, a model the ARMs never saw, see judge.py), the mean entropy of
the distribution each step sampled from, and the temperature.

Every guided setting gets a control row: the UNGUIDED base sampled at the temperature T_c at
which its own sampled distributions are as sharp as the guided run's were (see `match_temperature`).
A guided ARM sharpens the distribution, and a sharper distribution alone raises the base's
log-prob per token; the control shows how much of a change sharpening alone explains.

    python -m benchmarks.bench_alignment [--prompts 30] [--max-tokens 256] [--seeds 3]
        [--settings 0:0,1:0,2:0,0:1,0:2,1:1 | grid] [--threads N] [--plot PNG] [--save JSONL]

Sampling: T 0.7, top-k 40, top-p 0.95, min-p 0.05; prompt i of seed s has the seed
`seed_for(1000 + s, i)` in every setting and in its control. All prompts of a run are decoded
together (--n-parallel at a time, default all of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from edge_genarm import sampling
from edge_genarm.batch import seed_for
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.errors import UserError
from edge_genarm.generation import encode_prompt
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry
from benchmarks.judge import Judge, judge_model, teacher_forced
from benchmarks.machine import print_header

SAMPLING = sampling.SamplingSettings(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05)
DEFAULT_SETTINGS = "0:0,1:0,2:0,0:1,0:2,1:1"
GRID = sorted({(p, c) for p in (0.0, 1.0, 2.0) for c in (0.0, 1.0, 2.0)} | {(0.5, 0.0), (0.0, 0.5)})
COLUMNS = [("T", "temp", 2), ("entropy (nats)", "entropy", 3), ("AFINN", "afinn", 2),
           ("words", "words", 1), ("AFINN per 100 words", "per100", 1),
           ("base log-prob", "base_lp", 3), ("judge log-prob", "judge_lp", 3)]


# -- the sampled distribution and its entropy ---------------------------------------------------
def candidates(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, scores at T = 1) that the sampler keeps: top-k, top-p, min-p in its order."""
    cands = sampling.all_candidates(row)
    cands = sampling.top_k(cands, SAMPLING.top_k)
    cands = sampling.top_p(cands, SAMPLING.top_p)
    cands = sampling.min_p(cands, SAMPLING.min_p)
    return sampling.candidate_ids(cands), cands[1]


def entropies(values: np.ndarray, temperature: float) -> np.ndarray:
    """Entropy (nats) of softmax(v / T) per row of v; -inf pads rows to one width."""
    z = values / np.float64(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    total = p.sum(axis=-1)
    return np.log(total) - np.sum(p * np.where(np.isfinite(z), z, 0.0), axis=-1) / total


def log_sum_exp(row: np.ndarray) -> float:
    top = float(np.max(row))
    return top + float(np.log(np.sum(np.exp(row - top), dtype=np.float64)))


def padded(rows: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), -np.inf)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def match_temperature(base_values: np.ndarray, target: float) -> float:
    """T_c at which the base's mean entropy over the given positions equals `target`.

    The positions are every step of the guided answers (their prefixes fed to the base alone)
    and the values the base's candidates there after the same filters; the filters work at
    T = 1, so the candidate sets do not depend on T and only softmax(v / T) over them does.
    That mean entropy grows with T, so bisection (on log T) finds the one T that matches.

    Why this entropy: the distribution a step samples from (filters, then T) is what decides
    how much chance the text takes, and temperature is the knob that sharpens it without
    steering it anywhere. Why the guided prefixes: both sides are then measured on the same
    contexts, and one base pass prices every T (the base's own answers would move with T).
    """
    lo, hi = np.log(1e-3), np.log(sampling.MAX_TEMPERATURE)
    for _ in range(60):
        mid = (lo + hi) / 2
        if entropies(base_values, np.exp(mid)).mean() < target:
            lo = mid
        else:
            hi = mid
    t_c = float(np.exp((lo + hi) / 2))
    if not 1.01e-3 < t_c < 0.99 * sampling.MAX_TEMPERATURE:
        print(f"warning: no temperature matches entropy {target:.3f}; T_c {t_c:g} is the "
              "nearest", file=sys.stderr)
    return t_c


# -- generation with per-step records ----------------------------------------------------------
def generate(engine: Engine, prompts: list[list[int]], seeds: list[int], temperature: float,
             max_tokens: int, k: int) -> list[dict]:
    """Answer every prompt, k sequences per decode, drawing with the product's own sampler.

    An answer ends at an end-of-generation token of the base or at max_tokens. Per step it
    records the entropy of the distribution sampled from (softmax(v / T) over the filtered
    candidates) and the log-prob of the drawn token under the unfiltered row at T = 1 (the
    base's log-prob when every alpha is 0).
    """
    draw = sampling.make_sampler(dataclasses.replace(SAMPLING, temperature=temperature))
    out = [dict(tokens=[], entropy=[], logprob=[]) for _ in prompts]
    for first in range(0, len(prompts), k):
        chunk = list(range(first, min(first + k, len(prompts))))
        seqs = {i: engine.new_sequence() for i in chunk}
        rngs = {i: np.random.default_rng(seeds[i]) for i in chunk}
        live, feed = chunk, [prompts[i] for i in chunk]
        while live:
            rows = engine.advance([seqs[i] for i in live], feed)
            rows = rows if rows.ndim == 2 else rows[None]
            for i, row in zip(live, rows):
                token = draw(row, rngs[i])
                ids, values = candidates(row)
                if token not in ids:  # the sampler and `candidates` must filter alike
                    raise RuntimeError("make_sampler drew a token outside the filtered set")
                out[i]["entropy"].append(float(entropies(values[None], temperature)[0]))
                out[i]["logprob"].append(float(row[token]) - log_sum_exp(row))
                out[i]["tokens"].append(token)
            live = [i for i in live if len(out[i]["tokens"]) < max_tokens
                    and not engine.model.is_eog(out[i]["tokens"][-1])]
            feed = [[out[i]["tokens"][-1]] for i in live]
        for seq in seqs.values():
            engine.release(seq)
    for rec in out:
        ended = engine.model.is_eog(rec["tokens"][-1])
        rec["finish"] = "stop" if ended else "length"
        text = b"".join(engine.model.token_bytes(t) for t in rec["tokens"][:-1 if ended else None])
        rec["text"] = text.decode("utf-8", errors="replace")
    return out


def answer_positions(engine: Engine, tokens: list[int]) -> int:
    """How many leading tokens coherence scores: all but a final end-of-generation token (the
    text's tokens), unless that token is the whole answer."""
    return len(tokens) - 1 if len(tokens) > 1 and engine.model.is_eog(tokens[-1]) else len(tokens)


def base_view(engine: Engine, prompts: list[list[int]], runs: list[dict], k: int) -> None:
    """Teacher-force the guided answers through the base alone: each run gets `base_lp_steps`
    (the base's log-prob of each token) and `base_cands` (its filtered candidate scores)."""
    with engine.alphas_zeroed():
        for first in range(0, len(prompts), k):
            chunk = range(first, min(first + k, len(prompts)))
            got = teacher_forced(engine, [prompts[i] for i in chunk],
                                 [runs[i]["tokens"] for i in chunk],
                                 lambda row, tok: (float(row[tok]), candidates(row)[1]))
            for i, steps in zip(chunk, got):
                runs[i]["base_lp_steps"] = [lp for lp, _ in steps]
                runs[i]["base_cands"] = [c for _, c in steps]


def summarize(engine: Engine, runs: list[dict], temperature: float, lp_key: str) -> dict:
    """One run's means over prompts (entropy: over every sampled step of every answer)."""
    from afinn import Afinn

    afinn = Afinn()
    texts = [r["text"] for r in runs]
    score = float(np.mean([afinn.score(t) for t in texts]))
    words = float(np.mean([len(t.split()) for t in texts]))
    return dict(temp=temperature, entropy=float(np.mean(sum((r["entropy"] for r in runs), []))),
                afinn=score, words=words, per100=100 * score / max(words, 1e-9),
                base_lp=float(np.mean([np.mean(r[lp_key][:answer_positions(engine, r["tokens"])])
                                       for r in runs])))


# -- one seed: every setting and its control -----------------------------------------------------
def run_setting(engine: Engine, prompts: list[list[int]], seeds: list[int], setting, args,
                k: int) -> list[dict]:
    """The guided run of a setting, and (unless every alpha is 0) its temperature-matched
    control: the base alone, same seeds, at the T_c that matches the guided run's entropy."""
    by_name = {a.name: a for a in engine.arms}
    by_name["positive"].alpha, by_name["concise"].alpha = setting
    t0 = time.time()
    guided = generate(engine, prompts, seeds, SAMPLING.temperature, args.max_tokens, k)
    if not any(setting):  # the base itself: its run is its own control
        return [dict(kind="guided", runs=guided, seconds=time.time() - t0,
                     **summarize(engine, guided, SAMPLING.temperature, "logprob"))]
    base_view(engine, prompts, guided, k)
    row = summarize(engine, guided, SAMPLING.temperature, "base_lp_steps")
    t_c = match_temperature(padded([c for r in guided for c in r["base_cands"]]),
                            row["entropy"])
    for r in guided:
        del r["base_cands"]  # a few floats per step, not needed once T_c is known
    t1 = time.time()
    with engine.alphas_zeroed():
        control = generate(engine, prompts, seeds, t_c, args.max_tokens, k)
    return [dict(kind="guided", runs=guided, seconds=t1 - t0, **row),
            dict(kind="control", runs=control, seconds=time.time() - t1,
                 **summarize(engine, control, t_c, "logprob"))]


def generate_all(args, chosen, held: list[str]) -> list[dict]:
    """Every (seed, setting) run on the demo preset, with its control; answers kept in memory."""
    reg = Registry.load()
    preset = reg.preset("demo")
    swap = dict(a.split("=", 1) for a in args.arm)
    arms = [ArmSpec(swap.get(a.name) or reg.resolve(a.model), 0.0, a.name) for a in preset.arms]
    k = args.n_parallel or len(held)
    context = ContextSettings(n_ctx=args.max_tokens + 128, n_seq_max=k, n_threads=args.threads)
    results = []
    with Engine.load(EngineConfig(reg.resolve(preset.base), arms, context)) as engine:
        prompts = [encode_prompt(engine, p) for p in held]
        if max(map(len, prompts)) + args.max_tokens > engine.n_ctx:
            raise UserError("a held-out prompt and --max-tokens do not fit the context")
        for s in range(args.seeds):
            seeds = [seed_for(args.seed + s, i) for i in range(len(held))]
            for setting in chosen:
                for res in run_setting(engine, prompts, seeds, setting, args, k):
                    res.update(setting=setting, seed=s)
                    results.append(res)
                    n_tok = sum(len(r["tokens"]) for r in res["runs"])
                    print(f"seed {s} {setting} {res['kind']}: T {res['temp']:.3f}, "
                          f"{n_tok} tokens in {res['seconds']:.0f} s", file=sys.stderr, flush=True)
    return results


def judge_all(args, judge_path: Path, results: list[dict], held: list[str]) -> None:
    """Score every answer of every run with the judge, K answers per decode."""
    t0 = time.time()
    k = args.n_parallel or len(held)
    # Its tokenizer splits text into about as many tokens as SmolLM2's: twice the room is ample
    judge = Judge(judge_path, k, 2 * args.max_tokens + 192, args.threads)
    try:
        texts = [r["text"] for res in results for r in res["runs"]]
        scores = iter(judge.score(held * len(results), texts))
    finally:
        judge.close()
    for res in results:
        for r in res["runs"]:
            r["judge_lp"] = next(scores)
        res["judge_lp"] = float(np.nanmean([r["judge_lp"] for r in res["runs"]]))
    print(f"judge: {len(texts)} answers in {time.time() - t0:.0f} s", file=sys.stderr)


# -- report ---------------------------------------------------------------------------------------
def aggregate(results: list[dict]) -> dict:
    """(setting, kind) -> {column: (mean, std across seeds)}, in the order of the runs."""
    groups: dict = {}
    for res in results:
        groups.setdefault((res["setting"], res["kind"]), []).append(res)
    return {key: {col: (float(np.mean([r[col] for r in rs])),
                        float(np.std([r[col] for r in rs], ddof=1)) if len(rs) > 1 else 0.0)
                  for _, col, _ in COLUMNS} for key, rs in groups.items()}


def print_table(table: dict, n_seeds: int) -> None:
    print("| alpha positive | alpha concise | run | " + " | ".join(h for h, _, _ in COLUMNS)
          + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for ((pos, con), kind), cols in table.items():
        run = "guided" if kind == "guided" else "control: base at T_c"
        cells = [f"{cols[c][0]:.{d}f} ± {cols[c][1]:.{d}f}" if n_seeds > 1 else
                 f"{cols[c][0]:.{d}f}" for _, c, d in COLUMNS]
        print(f"| {pos:g} | {con:g} | {run} | " + " | ".join(cells) + " |")


def save(path: Path, results: list[dict], held: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for res in results:
            for prompt, r in zip(held, res["runs"]):
                fh.write(json.dumps(dict(
                    seed=res["seed"], alphas=res["setting"], run=res["kind"], T=res["temp"],
                    prompt=prompt, text=r["text"], tokens=len(r["tokens"]), finish=r["finish"],
                    entropy=float(np.mean(r["entropy"])), judge_lp=r["judge_lp"]),
                    ensure_ascii=False) + "\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=30, help="held-out prompts (at most 40)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per setting (run seeds "
                    "--seed, --seed + 1, ...)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="(positive:concise) pairs, "
                    f"default {DEFAULT_SETTINGS}; 'grid' for the 3 x 3 grid and the two 0.5s")
    ap.add_argument("--n-parallel", type=int, default=0, help="sequences per decode "
                    "(default: every prompt at once)")
    ap.add_argument("--threads", type=int, default=0, help="threads per context (default: all)")
    ap.add_argument("--plot", type=Path, help="draw the trade-off plot here (default "
                    "docs/tradeoff.png when --settings is not given)")
    ap.add_argument("--save", type=Path, help="write every answer and its scores here (JSONL)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=GGUF",
                    help="try another ARM file for the preset's ARM NAME (a candidate build)")
    args = ap.parse_args(argv)
    if args.settings == "grid":
        args.chosen = GRID
    else:
        args.chosen = [tuple(float(x) for x in pair.split(":"))
                       for pair in args.settings.split(",")]
    if args.plot is None and args.settings == DEFAULT_SETTINGS:
        args.plot = ROOT / "docs" / "tradeoff.png"
    return args


def main() -> None:
    args = parse_args()
    print_header()
    t0 = time.time()
    held = (ROOT / "recipes" / "demo" / "held_out_prompts.txt").read_text().split("\n")
    held = [p for p in held if p][: args.prompts]
    judge_path = judge_model()  # joined and checked first: a missing part fails fast
    results = generate_all(args, args.chosen, held)
    judge_all(args, judge_path, results, held)
    table = aggregate(results)
    print_table(table, args.seeds)
    n_tok = sum(len(r["tokens"]) for res in results for r in res["runs"])
    print(f"\n{len(held)} held-out prompts, {len(args.chosen)} settings and their controls, "
          f"{args.seeds} seeds (mean ± standard deviation across seeds of the per-seed means), "
          f"{n_tok} tokens generated, {time.time() - t0:.0f} s wall time")
    if args.save:
        save(args.save, results, held)
    if args.plot:
        plot(table, args.plot)


def plot(table: dict, path: Path) -> None:
    """AFINN against words: guided settings filled, each control open, joined by a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for ((pos, con), kind), cols in table.items():
        (x, dx), (y, dy) = cols["words"], cols["afinn"]
        if kind == "control":
            gx, gy = table[((pos, con), "guided")]["words"][0], \
                table[((pos, con), "guided")]["afinn"][0]
            ax.plot([gx, x], [gy, y], ":", color="grey", lw=1)
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", mfc="white", color="grey", ms=6)
            continue
        color = [min(pos / 2, 1), 0.2, max(1 - pos / 2, 0)]
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", color=color, ms=5 + 3 * con)
        ax.annotate(f"({pos:g}, {con:g})", (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("mean answer length (words)  <- concise")
    ax.set_ylabel("mean AFINN score  -> positive")
    ax.set_title("Demo ARMs, held-out prompts: (alpha positive, alpha concise)\n"
                 "open grey: the base alone at the entropy-matched temperature", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

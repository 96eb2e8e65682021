"""How a reward model ranks the base's next-token candidates: the lead on why PARGS does or does
not move an objective. Greedy answers of the demo base to held-out prompts; at each step the
base's top `--candidates` tokens, each scored by the reward model (prefix + token, the head on
its hidden state), against two references for the same candidates: the positive ARM's
log-ratio log p_arm - log p_base (GenARM's token reward) and the AFINN valence of the token's
text. Prints the mean per-step rank correlation with each, the reward's spread over the top 10,
and the mean AFINN valence of the token that the base alone, base + w x reward and
base + w x ARM log-ratio would pick among the top 10.

Independent of edge-genarm's engine: llama-cpp-python's own `Llama` for the base, the ARM and
the reward model (the LoRA on the same base file, per-token embeddings), one decode per
candidate, the head applied in NumPy.

    python -m benchmarks.bench_candidates [--reward-model @demo-positive-rm] [--prompts 6]
                                          [--tokens 40] [--candidates 20] [--weights 0,1,4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp
import numpy as np

from benchmarks.machine import print_header
from edge_genarm.registry import resolve_model
from edge_genarm.reward import read_head
from tests.reference import reference_llama

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def log_probs(llm) -> np.ndarray:
    n = llm.n_vocab()
    x = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n,))
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def rank_corr(a, b) -> float | None:
    if np.std(a) == 0 or np.std(b) == 0:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def steps(args, head) -> list[tuple]:
    """(base log-probs, ARM log-ratios, rewards, AFINN valences) of each step's candidates."""
    from afinn import Afinn

    afinn = Afinn()
    base_path = resolve_model("@smollm2-q8")
    kw = dict(n_ctx=512, verbose=False, n_threads=args.threads or None,
              n_threads_batch=args.threads or None)
    base = reference_llama(base_path, logits_all=False, **kw)
    arm = reference_llama(base_path, lora_path=str(resolve_model("@demo-positive")),
                          logits_all=False, **kw)
    rm = reference_llama(base_path, lora_path=str(resolve_model(args.reward_model)),
                         embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, **kw)
    prompts = (ROOT / "recipes" / "demo" / "held_out_prompts.txt").read_text().splitlines()
    rows = []
    for prompt in prompts[:args.prompts]:
        ids = base.tokenize(TEMPLATE.format(prompt).encode(), add_bos=False, special=True)
        for m in (base, arm, rm):
            m.reset()
            m.eval(ids)
        for _ in range(args.tokens):
            lb, la = log_probs(base), log_probs(arm)
            cand = np.argsort(-lb, kind="stable")[:args.candidates]
            rewards = []
            for t in cand:  # one decode per candidate, taken back off the cache
                rm.eval([int(t)])
                hidden = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(rm.ctx, -1),
                                               shape=(rm.n_embd(),))
                rewards.append(float(head(hidden[None])[0]))
                rm.n_tokens -= 1
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(rm.ctx), 0,
                                              rm.n_tokens, -1)
            valence = [afinn.score(base.detokenize([int(t)]).decode(errors="replace"))
                       for t in cand]
            rows.append((lb[cand], la[cand] - lb[cand], np.array(rewards), np.array(valence)))
            token = int(cand[0])
            if token == base.token_eos():
                break
            for m in (base, arm, rm):
                m.eval([token])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reward-model", default="@demo-positive-rm")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=40, help="greedy steps per prompt")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--weights", default="0,1,4")
    ap.add_argument("--threads", type=int, default=0, help="0: llama.cpp's default")
    args = ap.parse_args()
    print_header()
    head = read_head(resolve_model(args.reward_model))
    rows = steps(args, head)

    def mean_corr(i, j):
        values = [c for r in rows if (c := rank_corr(r[i], r[j])) is not None]
        return (float(np.mean(values)) if values else float("nan")), len(values)

    print(f"reward model {args.reward_model}: {len(rows)} greedy steps over {args.prompts} "
          f"held-out prompts, the base's top {args.candidates} candidates each\n")
    print("| rank correlation of the candidates' rewards with | mean per step | steps |")
    print("|---|---|---|")
    for label, j in (("the positive ARM's log-ratio", 1), ("their AFINN valence", 3),
                     ("the base's log-prob", 0)):
        value, n = mean_corr(2, j)
        print(f"| {label} | {value:.3f} | {n} |")
    spread = np.median([np.ptp(r[2][:10]) for r in rows])
    gap = np.median([r[0][0] - r[0][1] for r in rows])
    print(f"\nmedian reward spread over the top 10: {spread:.2f}; median gap between the base's "
          f"two best log-probs: {gap:.2f}\n")
    print("| weight w | AFINN valence of the pick: base + w x reward | base + w x ARM log-ratio |")
    print("|---|---|---|")
    for w in (float(x) for x in args.weights.split(",")):
        by_rm = np.mean([r[3][np.argmax(r[0][:10] + w * r[2][:10])] for r in rows])
        by_arm = np.mean([r[3][np.argmax(r[0][:10] + w * r[1][:10])] for r in rows])
        print(f"| {w:g} | {by_rm:.3f} | {by_arm:.3f} |")


if __name__ == "__main__":
    main()

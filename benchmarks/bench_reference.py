"""edge-genarm against the reference engine GenARM's users run: PyTorch and transformers.

The reference is the loop of GenARM's own code: the base and the ARM as two PyTorch models, each
with its KV cache; per token, log-softmax of both, log p_base + alpha * log p_arm, argmax. Both
engines get the same weights (the GGUFs dequantized to float32 by convert.from_gguf; a LoRA ARM
is merged into a copy of its base for PyTorch, while edge-genarm runs it as an adapter on the one
loaded base), the same prompt ids (the chat template applied once), greedy decoding, the same
stop tokens and --tokens new tokens at most.

Printed per pair of models: identical-token prefixes (how many of the first --tokens greedy
tokens the two engines share, per prompt: the quantized activations of llama.cpp and PyTorch's
float32 can part at a near-tie), and generated tokens/s of the reference, of edge-genarm one
request at a time as the reference runs, and of edge-genarm with every prompt submitted at once
(its scheduler batches them). Tokens/s counts from the first prompt's prefill to the last token.

    python -m benchmarks.bench_reference [--pairs smollm2,coder] [--prompts 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from benchmarks.scoring import greedy_answers
from edge_genarm.convert.from_gguf import gguf_to_hf
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.generation import encode_prompt
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry

# name -> (base model, LoRA ARM, where its held-out prompts are, alpha)
PAIRS = {
    "smollm2": ("@smollm2-q8", "@demo-positive", "recipes/demo/held_out_prompts.txt", 1.0),
    "coder": ("@qwen-coder-0.5b", "edge_genarm/coder/documented.gguf",
              "recipes/coder/held_out_requests.txt", 1.0),
}


def load_torch(hf_dir: Path):
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir,
                                                             dtype=torch.float32).eval()


def reference_generate(base, arm, alpha: float, ids: list[int], max_tokens: int,
                       stops: set[int]) -> list[int]:
    """GenARM's decoding loop in PyTorch: two models, two KV caches, greedy on the sum."""
    import torch

    out: list[int] = []
    with torch.inference_mode():
        step = torch.tensor([ids])
        b = base(step, use_cache=True)
        a = arm(step, use_cache=True)
        while len(out) < max_tokens:
            scores = (torch.log_softmax(b.logits[0, -1].double(), -1)
                      + alpha * torch.log_softmax(a.logits[0, -1].double(), -1))
            token = int(scores.argmax())
            out.append(token)
            if token in stops:
                break
            step = torch.tensor([[token]])
            b = base(step, past_key_values=b.past_key_values, use_cache=True)
            a = arm(step, past_key_values=a.past_key_values, use_cache=True)
    return out


def shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Leading tokens in common; two equal answers that stopped early count as `limit`."""
    if a == b:
        return limit
    return next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)


def compare(name: str, args, work: Path) -> None:
    import torch

    base_name, arm_name, prompts_file, alpha = PAIRS[name]
    reg = Registry.load()
    base_path = reg.resolve(base_name)
    arm_path = reg.resolve(arm_name) if arm_name.startswith("@") else ROOT / arm_name
    if not arm_path.exists():
        raise SystemExit(f"{arm_path} is missing: build it first (see its build script)")
    texts = (ROOT / prompts_file).read_text().splitlines()[:args.prompts]
    config = EngineConfig(base_path, [ArmSpec(arm_path, alpha, "arm")],
                          ContextSettings(n_ctx=1024, n_seq_max=len(texts),
                                          n_threads=args.threads))
    with Engine.load(config) as engine:
        prompts = [encode_prompt(engine, t) for t in texts]
        stops = {t for t in range(engine.n_vocab) if engine.model.is_eog(t)}
        t0 = time.perf_counter()
        single = [greedy_answers(engine, [t], alpha, args.tokens)[0][0][0] for t in texts]
        single_speed = sum(map(len, single)) / (time.perf_counter() - t0)
        _, batched_speed = greedy_answers(engine, texts, alpha, args.tokens)

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    base = load_torch(gguf_to_hf(base_path, work / f"{name}-base"))
    arm = load_torch(gguf_to_hf(base_path, work / f"{name}-arm", adapter=arm_path))
    t0 = time.perf_counter()
    reference = [reference_generate(base, arm, alpha, ids, args.tokens, stops)
                 for ids in prompts]
    reference_speed = sum(map(len, reference)) / (time.perf_counter() - t0)

    prefixes = [shared_prefix(r, s, args.tokens) for r, s in zip(reference, single)]
    print(f"| {name} ({base_name} + {Path(arm_name).name} at {alpha:g}) | "
          f"{sum(prefixes) / len(prefixes):.1f} (min {min(prefixes)}; "
          f"{sum(p == args.tokens for p in prefixes)}/{len(prefixes)} whole) | "
          f"{reference_speed:.2f} | {single_speed:.1f} ({single_speed / reference_speed:.1f}x) | "
          f"{batched_speed:.1f} ({batched_speed / reference_speed:.1f}x) |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="smollm2,coder", help=f"among {', '.join(PAIRS)}")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="0: every core")
    args = ap.parse_args()
    print_header()
    print(f"{args.prompts} held-out prompts per pair, greedy, {args.tokens} new tokens at most")
    print(f"| models | identical-token prefix (of {args.tokens}) | reference tok/s | edge-genarm "
          "one at a time tok/s | edge-genarm all at once tok/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        for name in args.pairs.split(","):
            compare(name, args, Path(tmp))


if __name__ == "__main__":
    main()

"""Guided decoding speed and memory on SmolLM2-135M-Instruct, measured side by side in one run.

For an ARM that is a full model and for a LoRA ARM it prints tokens/s of
  base alone   a bare loop: decode one token in the base context, argmax of its logits view
  ARM alone    the same bare loop on the ARM's context
  guided       edge-genarm's engine and greedy sampler: both decodes, two log-softmaxes, the sum
and the ratio  guided time per token / (base time per token + ARM time per token), so that the
glue (Python, NumPy, combination, sampling) shows as the excess over 1. The three loops run back
to back in every repeat and the ratio is the median of the per-repeat ratios, so that drift in
the speed of a shared machine hits the three alike. `glue ms` is measured directly: the guided
time per token less the time spent inside the contexts' decode calls. Peak memory is measured in
fresh processes, one per configuration, with llama.cpp's own buffer sizes; the *outputs* section
measures the base alone twice more, with edge-genarm's output reservation (one logits row per
sequence) and with llama.cpp's default (n_outputs_max 0: one row per batch position), to show
what the reservation does to the compute buffer.

    python -m benchmarks.bench_guided [--tokens 64] [--repeats 15] [--threads 1,2]
                                      [--sections speed,memory,outputs]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from edge_genarm.convert.gguf_out import write_lora_adapter
from edge_genarm.convert.synthetic import random_lora_pairs
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.scheduler import Request, Scheduler
from edge_genarm.gguf_file import inspect_gguf
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import resolve_model
from edge_genarm.sampling import SamplingSettings

# Raw text that greedy decoding carries on for hundreds of tokens: the guided loop runs a real
# request, which would end at an end-of-generation token.
PROMPT = "Counting from one to five hundred: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def make_lora(base: Path, out: Path, rank: int = 8) -> Path:
    """A rank-8 LoRA on q, k, v and o of every layer, as a GenARM LoRA ARM would be."""
    shapes = {k: (v[1], v[0]) for k, v in inspect_gguf(base).shapes.items() if len(v) == 2}
    pairs = random_lora_pairs(shapes, rank=rank, seed=0,
                              targets=("attn_q", "attn_k", "attn_v", "attn_output"))
    return write_lora_adapter(out, "llama", 2.0 * rank, pairs)


def bare_loop(ctx, prompt_ids, n_tokens, seq_id=0) -> float:
    """Seconds per token of decode + argmax on one context (the least any loop must do)."""
    ctx.seq_remove(seq_id)
    logits = ctx.decode([(seq_id, prompt_ids, 0)])[0]
    pos = len(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = int(np.argmax(logits))
        logits = ctx.decode([(seq_id, [token], pos)])[0]
        pos += 1
    seconds = (time.perf_counter() - t0) / n_tokens
    ctx.seq_remove(seq_id)  # the engine's next sequence on this id starts from an empty cache
    return seconds


def guided_loop(engine, prompt_ids, n_tokens) -> tuple[float, float]:
    """Seconds per token of edge-genarm's guided step (greedy), prefill excluded, and of that
    the seconds spent outside llama.cpp's decode calls (the glue)."""
    scheduler = Scheduler(engine)
    handle = scheduler.submit(Request(tuple(prompt_ids), SamplingSettings(greedy=True),
                             max_tokens=n_tokens + 8, stop=(), seed=0))
    scheduler.step()  # prefill and the first token
    in_decode = [0.0]
    contexts = [engine.base] + [a.context for a in engine.arms]
    for ctx in contexts:  # time each decode call, on the instance only
        def timed(entries, _decode=ctx.decode):
            t = time.perf_counter()
            out = _decode(entries)
            in_decode[0] += time.perf_counter() - t
            return out
        ctx.decode = timed
    t0 = time.perf_counter()
    for _ in range(n_tokens):  # one scheduler step: decodes, combination, sampling, text
        scheduler.step()
    total = time.perf_counter() - t0
    if handle.done:  # an end-of-generation token would leave later steps with nothing to do
        raise SystemExit("the guided answer ended before --tokens; use a prompt that goes on")
    for ctx in contexts:
        del ctx.decode
    scheduler.close()
    return total / n_tokens, (total - in_decode[0]) / n_tokens


def speed(base: Path, arm: Path, threads: int, n_tokens: int, repeats: int, n_ctx: int):
    settings = ContextSettings(n_ctx=n_ctx, n_threads=threads)
    with Engine.load(EngineConfig(base, [ArmSpec(arm, 1.0)], settings)) as engine:
        ids = engine.model.tokenize(PROMPT, add_special=True)
        guided_loop(engine, ids, 8)  # warm-up: first-use allocations
        runs = {"base": [], "arm": [], "guided": [], "glue": [], "ratio": []}
        for _ in range(repeats):
            runs["base"].append(bare_loop(engine.base, ids, n_tokens))
            runs["arm"].append(bare_loop(engine.arms[0].context, ids, n_tokens))
            guided, glue = guided_loop(engine, ids, n_tokens)
            runs["guided"].append(guided)
            runs["glue"].append(glue)
            runs["ratio"].append(guided / (runs["base"][-1] + runs["arm"][-1]))
    return {k: statistics.median(v) for k, v in runs.items()}


MEMORY_SCRIPT = """
import re, sys
from pathlib import Path
import llama_cpp
from edge_genarm import llama
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.generation import run_to_end
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler
llama.set_verbose(True)
outputs, base, n_ctx = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
arms = [ArmSpec(Path(p), 1.0) for p in sys.argv[4:]]
if outputs == "llama-default":
    # the package offers no setting for this: its context parameters are wrapped in this child
    project_params = llama._context_params
    def default_outputs(settings):
        params = project_params(settings)
        params.n_outputs_max = llama_cpp.llama_context_default_params().n_outputs_max
        return params
    llama._context_params = default_outputs
with Engine.load(EngineConfig(base, arms, llama.ContextSettings(n_ctx=n_ctx))) as e:
    ids = e.model.tokenize("Hello " * (n_ctx // 2), add_special=True)
    s = Scheduler(e)
    run_to_end(s, [s.submit(Request(tuple(ids), SamplingSettings(greedy=True), max_tokens=32))])
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would inherit ours
    print("PEAK_KIB", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def memory(base: Path, arms: list[Path], n_ctx: int, outputs: str = "project") -> dict:
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, outputs, str(base), str(n_ctx),
                           *map(str, arms)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"the memory probe failed:\n{proc.stderr[-2000:]}")
    peak = int(re.search(r"PEAK_KIB (\d+)", proc.stdout).group(1)) / 1024
    def total(pattern):
        return sum(float(x) for x in re.findall(pattern, proc.stderr))
    return {"peak": peak,
            "kv": total(r"llama_kv_cache: +\S+ KV buffer size = +([\d.]+) MiB"),
            "compute": total(r"sched_reserve: +\S+ compute buffer size = +([\d.]+) MiB"),
            "adapter": total(r"llama_adapter_lora_init_impl: +\S+ LoRA buffer size = +([\d.]+) "
                             r"MiB"),
            "n_outputs_max": re.findall(r"n_outputs_max += +(\d+)", proc.stderr)}


def speed_table(base: Path, arms: list[tuple[str, Path]], args) -> None:
    print(f"base: {base.name}; {args.tokens} tokens greedy, median of {args.repeats}, "
          f"context {args.ctx_size}\n")
    print("| ARM | threads/context | base tok/s | ARM tok/s | guided tok/s | glue ms/token | "
          "ratio |")
    print("|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        for label, arm in arms:
            s = speed(base, arm, threads, args.tokens, args.repeats, args.ctx_size)
            print(f"| {label} | {threads} | {1 / s['base']:.1f} | {1 / s['arm']:.1f} | "
                  f"{1 / s['guided']:.1f} | {1000 * s['glue']:.2f} | {s['ratio']:.3f} |",
                  flush=True)


def memory_table(base: Path, lora: Path, full: Path, n_ctx: int) -> None:
    print(f"\npeak memory, a fresh process each: context {n_ctx}, a prompt of about {n_ctx // 2} "
          "tokens, 32 generated")
    print("| configuration | peak RSS MiB | extra MiB | KV cache MiB | compute MiB | adapter MiB |")
    print("|---|---|---|---|---|---|")
    alone = memory(base, [], n_ctx)
    for label, arms in (("base alone", []), ("+ LoRA ARM", [lora]), ("+ full-model ARM", [full]),
                        ("+ the base file as ARM (weights shared)", [base])):
        m = alone if not arms else memory(base, arms, n_ctx)
        print(f"| {label} | {m['peak']:.0f} | {m['peak'] - alone['peak']:+.0f} | {m['kv']:.0f} | "
              f"{m['compute']:.0f} | {m['adapter']:.1f} |", flush=True)


def outputs_table(base: Path, n_ctx: int) -> None:
    print("\nthe base alone, a fresh process each (as above): the logits rows a context reserves")
    print("| output reservation | n_outputs_max | compute MiB | peak RSS MiB |")
    print("|---|---|---|---|")
    for label, outputs in (("edge-genarm: one row per sequence", "project"),
                           ("llama.cpp's default: one row per batch position", "llama-default")):
        m = memory(base, [], n_ctx, outputs)
        print(f"| {label} | {', '.join(m['n_outputs_max'][:1]) or '?'} | {m['compute']:.1f} | "
              f"{m['peak']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--sections", default="speed,memory,outputs",
                    help="which tables to print: speed, memory, outputs")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if sections - {"speed", "memory", "outputs"}:
        ap.error(f"unknown section in --sections {args.sections}; use speed, memory, outputs")

    print_header()
    base = resolve_model("@smollm2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-genarm-"))
    try:
        lora = make_lora(base, tmp / "lora-r8.gguf")
        full = tmp / "full-arm.gguf"  # a second file, so it is loaded as a model of its own
        shutil.copy(base, full)
        if "speed" in sections:
            speed_table(base, [("full model", full), ("LoRA r8", lora)], args)
        if "memory" in sections:
            memory_table(base, lora, full, args.ctx_size)
        if "outputs" in sections:
            outputs_table(base, args.ctx_size)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

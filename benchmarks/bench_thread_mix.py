"""Guided decoding on edge-genarm's stepping thread after llama.cpp decoded on the caller's thread.

An OpenMP build of llama.cpp (GCC's libgomp) keeps a pool of worker threads per thread that has
decoded; with more pooled threads than CPUs, libgomp's barriers stop spinning and sleep in the
kernel, one per graph node. Each variant runs in a fresh child process and times the Python API's
batched greedy generation (`edge_genarm.load(preset, parallel=P).generate_batch`):

- fresh: nothing decoded before the model loads;
- after a plain loop, pool kept: llama-cpp-python's `Llama` first decodes on the main thread, and
  its idle OpenMP pool stays (edge-genarm's release switched off: the behaviour before the fix);
- after a plain loop, pool released: the same, as edge-genarm runs now (the worker, started on
  the loading thread, releases that thread's idle pool: `llama.release_openmp_threads`).

Prints, per variant, tokens/s of each repeat, the process's thread count while decoding, and the
voluntary context switches per token (a barrier that sleeps instead of spinning shows there,
whatever else the machine runs).
Run: `python -m benchmarks.bench_thread_mix` (see --help).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.machine import print_header

CHILD = """
import json, os, sys, time
variant, preset, parallel, tokens, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
import edge_genarm
from edge_genarm import llama
from edge_genarm.registry import Registry, resolve_model
if variant != "fresh":
    import llama_cpp
    base = resolve_model(Registry.load().preset(preset).base)
    plain = llama_cpp.Llama(str(base), n_ctx=256, verbose=False)
    plain("Once upon a time", max_tokens=16, temperature=0)  # decodes on this (the main) thread
if variant == "kept":
    llama.release_openmp_threads = lambda: False  # the behaviour before the fix
prompts = [f"Tell me something about the number {i}." for i in range(parallel)]


def sleeps():
    # voluntary context switches of every thread of this process so far: an OpenMP barrier
    # that stops spinning sleeps in the kernel, one switch per waiting thread
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            status = open(f"/proc/self/task/{task}/status").read()
        except OSError:
            continue
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


rates, threads, switches, made = [], 0, 0, 0
with edge_genarm.load(preset, parallel=parallel) as model:
    model.generate_batch(prompts[:1], max_tokens=2, temperature=0)  # warm-up
    for _ in range(repeats):
        start, before = time.perf_counter(), sleeps()
        results = model.generate_batch(prompts, max_tokens=tokens, temperature=0, ignore_eos=True)
        rates.append(sum(len(r.tokens) for r in results) / (time.perf_counter() - start))
        switches += sleeps() - before
        made += sum(len(r.tokens) for r in results)
        threads = max(threads, len(os.listdir("/proc/self/task")))
print(json.dumps({"rates": rates, "threads": threads, "sleeps": switches / made}))
"""

VARIANTS = [("fresh", "fresh"), ("kept", "after a plain loop, pool kept (before)"),
            ("released", "after a plain loop, pool released (now)")]


def run(variant: str, args) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, variant, args.preset, str(args.parallel),
                          str(args.max_tokens), str(args.repeats)], capture_output=True,
                         text=True, timeout=1800, env=os.environ)
    if res.returncode != 0:
        raise SystemExit(f"{variant}: exit {res.returncode}\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--parallel", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per variant")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each variant runs, interleaved (a busy machine drifts)")
    args = parser.parse_args()
    print_header()
    print(f"{args.preset}, {args.parallel} sequences x {args.max_tokens} tokens, greedy; "
          f"median of each variant's batches\n")
    rates: dict[str, list[float]] = {v: [] for v, _ in VARIANTS}
    threads: dict[str, int] = {}
    sleeps: dict[str, list[float]] = {v: [] for v, _ in VARIANTS}
    for _ in range(args.rounds):
        for variant, _ in VARIANTS:
            out = run(variant, args)
            rates[variant] += out["rates"]
            threads[variant] = out["threads"]
            sleeps[variant].append(out["sleeps"])
    # sleeps: voluntary context switches per token; libgomp's barriers sleep instead of spin
    # where it counts more pooled threads than CPUs (busy machines aside, the slow case)
    print("| variant | tok/s (median) | each batch | threads | sleeps per token |")
    print("|---|---:|---|---:|---:|")
    for variant, label in VARIANTS:
        each = sorted(rates[variant])
        median = each[len(each) // 2]
        print(f"| {label} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates[variant])} | "
              f"{threads[variant]} | {sum(sleeps[variant]) / len(sleeps[variant]):.0f} |")


if __name__ == "__main__":
    main()

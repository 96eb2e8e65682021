"""Batch generation throughput: generated tokens/s against K, by weight type, and how often a
batched greedy text differs from the one-at-a-time text.

0. Shared prefixes: prompt tokens decoded and generated tokens/s at K = 1 and K = 8, with and
   without copying a prompt's prefix from a sequence that holds it.
1. Curve: the demo preset (SmolLM2-135M-Instruct as Q8_0 + the `positive` LoRA ARM; `concise`
   at alpha 0 is not stepped), the 40 held-out prompts, sampling with a fixed seed, `--max-tokens`
   each; generated tokens / wall time for K = 1, 2, 4, 8, 16 (runs in the order 1..16 then 16..1,
   the median of the two, since this VM drifts).
2. Weight types: the shipped Q4_1 file and requantizations of it (`--types`, default F16, Q8_0,
   Q4_0, Q4_1, Q4_K_M) with the same LoRA ARM; tokens/s at K = 1 and K = 8 and their ratio.
3. Invariance: greedy texts of the 40 prompts at K = 4 against K = 1, with and without --exact.
4. Where the time goes (--split): at K = 1 and K = 8, the time inside llama.cpp's decode calls,
   split into calls that carry a prompt (prefill) and calls of one token per sequence.

    python -m benchmarks.bench_batch [--max-tokens 64] [--skip-types] [--types Q4_1,Q8_0] [--split]
                                     [--prompts 40] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from edge_genarm.api import Model
from edge_genarm.batch import Item, run_batch
from edge_genarm.engine import ArmSpec
from edge_genarm.llama import quantize_model
from edge_genarm.config import ArmRef
from edge_genarm.options import configure
from edge_genarm.registry import Registry

PROMPTS = (ROOT / "recipes" / "demo" / "held_out_prompts.txt").read_text().split("\n")[:-1]


def run(base: Path, arm: ArmSpec, k: int, cfg: argparse.Namespace, greedy: bool = False,
        exact: bool = False, share: bool = True) -> tuple[float, dict, int, int]:
    """(generated tokens per second, id -> tokens, prompt tokens decoded, prompt tokens) for the
    held-out prompts at K = k, with or without shared prefixes; `cfg` holds --max-tokens,
    --prompts and --threads."""
    config = configure(None, {
        "base": str(base), "arms": (ArmRef(str(arm.path), arm.alpha, arm.name),),
        "greedy": greedy, "max_tokens": cfg.max_tokens, "seed": 0, "ctx_size": 512,
        "parallel": k, "exact": exact, "threads": cfg.threads or None})
    items = [Item(i, i, prompt=p) for i, p in enumerate(PROMPTS[:cfg.prompts])]
    out: dict = {}
    with Model(config, share_prefixes=share) as model:
        t0 = time.perf_counter()
        run_batch(model, items, 0, lambda r: out.__setitem__(r["id"], r))
        seconds = time.perf_counter() - t0
    tokens = {i: r["tokens"] for i, r in out.items()}
    prompt = sum(r["prompt_tokens"] for r in out.values())
    decoded = prompt - sum(r["cached_tokens"] for r in out.values())
    return sum(map(len, tokens.values())) / seconds, tokens, decoded, prompt


def curve(base: Path, arm: ArmSpec, cfg: argparse.Namespace) -> None:
    ks = [1, 2, 4, 8, 16]
    rates: dict[int, list[float]] = {k: [] for k in ks}
    for k in ks + ks[::-1]:
        rates[k].append(run(base, arm, k, cfg)[0])
    one = statistics.median(rates[1])
    print("| K | generated tokens/s | x K = 1 |")
    print("|---|---|---|")
    for k in ks:
        r = statistics.median(rates[k])
        print(f"| {k} | {r:.1f} | {r / one:.2f} |")


def prefixes(base: Path, arm: ArmSpec, cfg: argparse.Namespace) -> None:
    """K = 1 and K = 8 with and without shared prefixes, in the order on, off, off, on so that
    drift hits both alike; the median of the two runs."""
    print("| K | shared prefixes | prompt tokens | prompt tokens decoded | generated tokens/s |")
    print("|---|---|---|---|---|")
    gains = []
    for k in (1, 8):
        runs: dict[bool, list] = {True: [], False: []}
        for share in (True, False, False, True):
            runs[share].append(run(base, arm, k, cfg, share=share))
        got = {}
        for share in (False, True):
            rate = statistics.median(r[0] for r in runs[share])
            _, _, decoded, prompt = runs[share][0]
            got[share] = decoded, rate
            print(f"| {k} | {'on' if share else 'off'} | {prompt} | {decoded} | {rate:.1f} |",
                  flush=True)
        (decoded_off, rate_off), (decoded_on, rate_on) = got[False], got[True]
        gains.append(f"K = {k}: {100 * (1 - decoded_on / decoded_off):.0f} % fewer prompt "
                     f"tokens decoded, {100 * (rate_on / rate_off - 1):+.0f} % tokens/s")
    # after the table, so that it stays one table
    print("shared prefixes on against off: " + "; ".join(gains))


def weight_types(base: Path, arm: ArmSpec, cfg: argparse.Namespace, types: list[str]) -> None:
    """`base` is the shipped Q4_1 file; every other type is made from it."""
    print("| base weights | file MiB | K = 1 tok/s | K = 8 tok/s | K = 8 / K = 1 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in types:
            path = base if name == "Q4_1" else Path(tmp) / f"{name}.gguf"
            if name != "Q4_1":
                quantize_model(base, path, name, requantize=True)
            one = run(path, arm, 1, cfg)[0]
            eight = run(path, arm, 8, cfg)[0]
            size = path.stat().st_size / 2**20
            print(f"| {name} | {size:.0f} | {one:.1f} | {eight:.1f} | {eight / one:.2f} |",
                  flush=True)
            if path != base:
                path.unlink()


def invariance(base: Path, arm: ArmSpec, cfg: argparse.Namespace) -> None:
    print("| mode | greedy texts equal at K = 4 and K = 1 | first difference at token (median) |")
    print("|---|---|---|")
    for exact in (False, True):
        one = run(base, arm, 1, cfg, greedy=True, exact=exact)[1]
        four = run(base, arm, 4, cfg, greedy=True, exact=exact)[1]
        firsts = [next(i for i, (a, b) in enumerate(zip(one[k], four[k])) if a != b)
                  for k in one if one[k] != four[k]]
        where = f"{statistics.median(firsts):.0f}" if firsts else "-"
        print(f"| {'--exact' if exact else 'default'} | {len(one) - len(firsts)} of {len(one)} "
              f"| {where} |", flush=True)


def split(base: Path, arm: ArmSpec, cfg: argparse.Namespace) -> None:
    import edge_genarm.llama as llama

    spent = {"prefill": [0, 0.0], "one token each": [0, 0.0]}
    decode = llama.Context.decode

    def timed(self, entries):  # the benchmark's own probe around the adapter's decode
        kind = "prefill" if any(len(e[1]) > 1 for e in entries) else "one token each"
        t0 = time.perf_counter()
        try:
            return decode(self, entries)
        finally:
            spent[kind][0] += 1
            spent[kind][1] += time.perf_counter() - t0

    llama.Context.decode = timed
    try:
        print("| K | tok/s | wall s | prefill calls, s | one-token-each calls, s, ms/call |")
        print("|---|---|---|---|---|")
        for k in (1, 8):
            for v in spent.values():
                v[:] = [0, 0.0]
            t0 = time.perf_counter()
            rate = run(base, arm, k, cfg)[0]
            wall = time.perf_counter() - t0
            (pn, ps), (dn, ds) = spent["prefill"], spent["one token each"]
            print(f"| {k} | {rate:.1f} | {wall:.1f} | {pn}, {ps:.1f} | {dn}, {ds:.1f}, "
                  f"{1e3 * ds / max(dn, 1):.1f} |", flush=True)
    finally:
        llama.Context.decode = decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-types", action="store_true")
    ap.add_argument("--skip-curve", action="store_true", help="only the shared-prefix table")
    ap.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_1,Q4_K_M")
    ap.add_argument("--split", action="store_true", help="also time prefill against steps")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS),
                    help="the first N held-out prompts (a quick check of the script)")
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    args = ap.parse_args()
    print_header()
    reg = Registry.load()
    preset = reg.preset("demo")
    base = reg.resolve(preset.base)
    positive = next(a for a in preset.arms if a.name == "positive")
    arm = ArmSpec(reg.resolve(positive.model), positive.alpha, positive.name)
    print(f"demo preset: {base.name} + LoRA ARM {arm.name} (alpha {arm.alpha:g}); "
          f"{len(PROMPTS[:args.prompts])} held-out prompts, at most {args.max_tokens} tokens each")
    prefixes(base, arm, args)
    if not args.skip_curve:
        curve(base, arm, args)
    if not args.skip_types:
        weight_types(reg.resolve("@smollm2"), arm, args, args.types.upper().split(","))
    invariance(base, arm, args)
    if args.split:
        split(base, arm, args)


if __name__ == "__main__":
    main()

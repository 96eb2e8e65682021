"""What weight repacking (`--repack on` against `off`) is worth on this CPU, side by side.

For each model, both settings are loaded in turn and timed alternately (`--repeats` rounds):
prefill tokens/s (one prompt of about 300 tokens) and decode tokens/s (one sequence, greedy,
fixed length, prefill not timed), unguided. Where llama.cpp reports AMX, `on` takes the AMX
path that crashes on some CPUs: run it there only in a throwaway process.

    python -m benchmarks.bench_repack [--models @smollm2-q8,q4_0] [--tokens 64] [--repeats 3]

`q4_0` is SmolLM2 requantized to Q4_0 (a type CPU_REPACK takes on x86; Q8_0 and Q4_1 it does
not), made once into a temporary folder; any other name is an @model or a path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from benchmarks.scoring import decode_speed
from edge_genarm.engine import Engine, EngineConfig
from edge_genarm.llama import ContextSettings, quantize_model
from edge_genarm.registry import resolve_model

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def model_path(name: str, tmp: Path) -> Path:
    if name == "q4_0":
        path = tmp / "smollm2-q4_0.gguf"
        if not path.exists():
            quantize_model(resolve_model("@smollm2"), path, "Q4_0", requantize=True)
        return path
    return resolve_model(name) if name.startswith("@") else Path(name)


def prefill_speed(engine: Engine, n: int) -> float:
    ids = (engine.model.tokenize(PROMPT * 20, True) * 2)[:n]
    seq = engine.new_sequence()
    start = time.perf_counter()
    engine.advance([seq], [ids])
    seconds = time.perf_counter() - start
    engine.release(seq)
    return n / seconds


def measure(path: Path, repack: str, args) -> tuple[float, float, dict]:
    config = EngineConfig(path, [], ContextSettings(n_ctx=1024, n_threads=args.threads),
                          repack=repack)
    with Engine.load(config) as engine:
        prefill = prefill_speed(engine, args.prefill)
        decode = decode_speed(engine, [PROMPT], 0.0, args.tokens)
        return prefill, decode, engine.model.buffers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="@smollm2-q8,q4_0")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    args = ap.parse_args()
    print_header()
    print("| model | repack | weights in | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = model_path(name, Path(tmp))
            runs = {"on": [], "off": []}
            for _ in range(args.repeats):
                for repack in runs:
                    runs[repack].append(measure(path, repack, args))
            for repack, rows in runs.items():
                buffers = ", ".join(f"{k} {v:.0f} MiB" for k, v in rows[0][2].items())
                print(f"| {name} | {repack} | {buffers} | "
                      f"{statistics.median(r[0] for r in rows):.1f} | "
                      f"{statistics.median(r[1] for r in rows):.1f} |", flush=True)
            ratio = [a[1] / b[1] for a, b in zip(runs["on"], runs["off"])]
            pratio = [a[0] / b[0] for a, b in zip(runs["on"], runs["off"])]
            print(f"| {name} | on / off | | {statistics.median(pratio):.2f}x | "
                  f"{statistics.median(ratio):.2f}x |", flush=True)


if __name__ == "__main__":
    main()

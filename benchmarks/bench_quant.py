"""What requantizing the shipped SmolLM2 weights costs in quality: the mean log-prob per token of
fixed English texts (the docstrings of some standard-library modules, at most 300 tokens each)
under the shipped Q4_1 file and under requantizations of it made with llama.cpp's quantizer.
A higher (less negative) figure is a better model of the text; equal figures mean nothing lost.

    python -m benchmarks.bench_quant [--types Q8_0,Q4_0] [--texts N] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from benchmarks.scoring import answer_logprobs
from edge_genarm.engine import Engine, EngineConfig
from edge_genarm.llama import ContextSettings, quantize_model
from edge_genarm.registry import resolve_model

MODULES = ["textwrap", "json", "argparse", "collections", "pathlib", "zipfile", "csv", "logging",
           "sqlite3", "unittest", "email", "http", "tkinter", "decimal", "random", "heapq"]


def texts() -> list[str]:
    out = []
    for name in MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:
            continue
        if doc and len(doc) > 200:
            out.append(doc)
    return out


def mean_logprob(path: Path, docs: list[str], threads: int = 0) -> tuple[float, int]:
    settings = ContextSettings(n_ctx=512, n_seq_max=4, n_threads=threads)
    with Engine.load(EngineConfig(path, [], settings)) as e:
        ids = [e.model.tokenize(t, False, False)[:300] for t in docs]
        bos = e.model.special_token("bos")
        if bos >= 0:  # the first token is scored too
            starts = [[bos]] * len(ids)
        else:
            starts, ids = [a[:1] for a in ids], [a[1:] for a in ids]
        scores = answer_logprobs(e, starts, ids, 4)
    n = sum(map(len, ids))
    return sum(float(s.sum()) for s in scores) / n, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--texts", type=int, default=0, help="the first N texts only (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    args = ap.parse_args()
    print_header()
    shipped = resolve_model("@smollm2")
    docs = texts()[:args.texts or None]
    print("| weights | mean log-prob per token |")
    print("|---|---|")
    score, n = mean_logprob(shipped, docs, args.threads)
    print(f"| Q4_1 (shipped) | {score:.4f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [t for t in args.types.upper().split(",") if t]:
            path = Path(tmp) / f"{name}.gguf"
            quantize_model(shipped, path, name, requantize=True)
            score = mean_logprob(path, docs, args.threads)[0]
            print(f"| {name} (from Q4_1) | {score:.4f} |", flush=True)
    print(f"\n{len(docs)} texts, {n} tokens")


if __name__ == "__main__":
    main()

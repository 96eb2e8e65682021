"""How far llama.cpp's defaults (F16 KV cache, automatic flash attention) move next-token
log-probs from `--exact` (F32 KV cache, flash attention off), on SmolLM2-135M-Instruct.

The same texts (the convert verify probes, a prompt through the chat template and two longer
standard-library docstrings, at most --tokens tokens each) are fed to a default context and to
an exact one of the same model, and every next-token log-prob row is compared:
- *one token at a time*: every position of every text, each decoded as a one-token step;
- *whole text in one batch*: the last position after the text is decoded as one prefill batch.
Printed: the largest absolute difference over all tokens, the same over the tokens the exact
context gives p >= 1e-4, the median over positions of each row's largest difference, and the
top-1 agreement.

Each weight type of --types is measured: Q4_1 is the shipped file, any other type a
re-encoding of it made with llama.cpp's quantizer (F32: its weights exactly, dequantized).

    python -m benchmarks.bench_exact [--types Q4_1,Q8_0,F32] [--tokens 200] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from edge_genarm.convert.verify import PROBES
from edge_genarm import guidance
from edge_genarm.llama import Context, ContextSettings, Model, quantize_model
from edge_genarm.registry import resolve_model
from edge_genarm.templates import build_messages, render_chat

LIKELY = np.log(1e-4)


def texts(model: Model, n_tokens: int) -> list[list[int]]:
    import json
    import textwrap

    chat = render_chat(model.meta("tokenizer.chat_template"),
                       build_messages("Give me three tips for a good morning.", None),
                       model.token_text(model.special_token("bos")),
                       model.token_text(model.special_token("eos")))
    out = [model.tokenize(p, add_special=True) for p in PROBES]
    out.append(model.tokenize(chat, add_special=False))
    out += [model.tokenize(m.__doc__, add_special=True) for m in (textwrap, json)]
    return [ids[:n_tokens] for ids in out]


def stepped(ctx: Context, ids: list[int]) -> np.ndarray:
    """Log-prob rows after every position, each position decoded as a one-token step."""
    ctx.clear()
    return guidance.log_softmax(np.stack([np.array(ctx.decode([(0, [t], i)])[0])
                                          for i, t in enumerate(ids)]))


def prefilled(ctx: Context, ids: list[int]) -> np.ndarray:
    """The log-prob row after the last position, the whole text decoded as one batch."""
    ctx.clear()
    return guidance.log_softmax(np.array(ctx.decode([(0, ids, 0)])[0]))[None]


def compare(default: list[np.ndarray], exact: list[np.ndarray]) -> str:
    d, e = np.concatenate(default), np.concatenate(exact)
    diff = np.abs(d - e)
    rows = diff.max(axis=1)
    return (f"{len(rows)} | {diff.max():.2e} | {diff[e >= LIKELY].max():.2e} | "
            f"{np.median(rows):.2e} | "
            f"{100 * np.mean(d.argmax(1) == e.argmax(1)):.1f}%")


def measure(path: Path, label: str, n_tokens: int, threads: int) -> None:
    model = Model(path)
    try:
        ids = texts(model, n_tokens)
        n_ctx = max(64, max(map(len, ids)) + 8)
        contexts = [Context(model, ContextSettings(n_ctx=n_ctx, n_threads=threads, exact=exact))
                    for exact in (False, True)]
        try:
            for mode, run in (("one token at a time", stepped),
                              ("whole text in one batch", prefilled)):
                default, exact = ([run(ctx, t) for t in ids] for ctx in contexts)
                print(f"| {label} | {mode} | {compare(default, exact)} |", flush=True)
        finally:
            for ctx in contexts:
                ctx.close()
    finally:
        model.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_1,Q8_0,F32")
    ap.add_argument("--tokens", type=int, default=200, help="most tokens of each text")
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    args = ap.parse_args()
    print_header()
    shipped = resolve_model("@smollm2")
    model = Model(shipped, vocab_only=True)
    ids = texts(model, args.tokens)
    model.close()
    print(f"model: {shipped.name} (@smollm2) and re-encodings of it; {len(ids)} texts, "
          f"{sum(map(len, ids))} tokens ({min(map(len, ids))} to {max(map(len, ids))} each)\n")
    print("| weights | rows compared | positions | largest abs log-prob diff, all tokens | "
          "same, tokens with p >= 1e-4 | median over positions of the largest | "
          "top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.types.upper().split(","):
            path = shipped if name == "Q4_1" else Path(tmp) / f"{name}.gguf"
            if name != "Q4_1":
                quantize_model(shipped, path, name, requantize=True)
            measure(path, "Q4_1 (shipped)" if name == "Q4_1" else f"{name} (from Q4_1)",
                    args.tokens, args.threads)


if __name__ == "__main__":
    main()

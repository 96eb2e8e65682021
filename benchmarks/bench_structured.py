"""Structured output under load: JSON-schema requests against the same traffic unconstrained,
the grammar mask's share of a step, and edge-genarm's server beside llama-server's own
`json_schema`.

1. batch (in process): the demo preset (SmolLM2-135M Q8_0 guided by its `positive` LoRA ARM),
   16 concurrent requests (`--parallel 16`), each held-out prompt asked for a small JSON record
   (SCHEMA) or the same traffic without a schema, sampled with fixed seeds, `--max-tokens`
   each; generated tokens/s of each, run in the order free, json, json, free (this VM drifts)
   and the median taken; then the same for the base alone (ARMs off). The time inside the
   grammar's mask (`constraints.mask`) and inside the engine's step is summed, so the table
   shows what a constrained token costs beyond the step: guided and constrained at once should
   cost no more than guided plus the mask.
2. mask (in process): the same 16 JSON requests on qwen-coder-0.5b (a 151,936-token vocabulary):
   the mask's share of a step.
3. server (with --llama-server PATH): llama-server (built from the llama.cpp sources that
   llama-cpp-python's sdist vendors) and `edge-genarm serve`, one after another, on the demo
   base's GGUF, ARMs off, 16 concurrent clients sending chat requests with OpenAI's
   `response_format` json_schema; generated tokens/s from each reply's usage; every answer is
   checked to parse. Traffic goes to 127.0.0.1 only.

    python -m benchmarks.bench_structured [--max-tokens 48] [--prompts 16] [--threads N]
                                          [--sections batch,mask,server]
                                          [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.bench_server import server
from benchmarks.machine import print_header
from edge_genarm import constraints, engine as engine_module
import edge_genarm
from edge_genarm.registry import resolve_model

PROMPTS = (ROOT / "recipes" / "demo" / "held_out_prompts.txt").read_text().split("\n")[:-1]
SCHEMA = {"type": "object", "properties": {
    "topic": {"type": "string", "maxLength": 40},
    "answer": {"type": "string", "maxLength": 160},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["topic", "answer", "confidence"], "additionalProperties": False}
OFF = {"positive": 0.0, "concise": 0.0}


class Timers:
    """Seconds inside the grammar's mask and inside the engine's step, while installed."""

    def __init__(self):
        self.mask = self.step = 0.0

    @contextmanager
    def installed(self):
        mask, step = constraints.mask, engine_module.Engine.step

        def timed_mask(*a, **k):
            t0 = time.perf_counter()
            try:
                return mask(*a, **k)
            finally:
                self.mask += time.perf_counter() - t0

        def timed_step(*a, **k):
            t0 = time.perf_counter()
            try:
                return step(*a, **k)
            finally:
                self.step += time.perf_counter() - t0

        constraints.mask, engine_module.Engine.step = timed_mask, timed_step
        try:
            yield self
        finally:
            constraints.mask, engine_module.Engine.step = mask, step


def one_run(model, prompts: list[str], args, schema: dict | None, arms: dict | None) -> dict:
    """Generated tokens/s of the prompts decoded together, and the mask's and step's seconds."""
    options = {"max_tokens": args.max_tokens, "temperature": 0.8, "speculative": "off"}
    if schema is not None:
        options["json_schema"] = schema
    if arms is not None:
        options["arms"] = arms
    items = [{"prompt": p, "seed": i} for i, p in enumerate(prompts)]
    with Timers().installed() as timers:
        t0 = time.perf_counter()
        results = model.generate_batch(items, **options)
        wall = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    if schema is not None:  # every answer that ended is JSON of the schema's shape
        assert all(json.loads(r.text) for r in results if r.finish_reason == "stop")
    return {"tokens_s": tokens / wall, "tokens": tokens, "mask_ms": timers.mask * 1e3 / tokens,
            "step_ms": timers.step * 1e3 / tokens}


def batch(args) -> None:
    prompts = PROMPTS[:args.prompts]
    print("\n## 16 concurrent requests, JSON schema against free (in process)\n")
    print("| ARMs | traffic | generated tokens/s | step ms/token | mask ms/token | x free |")
    print("|---|---|---|---|---|---|")
    with edge_genarm.load("demo", parallel=16, threads=args.threads, ctx_size=512) as model:
        model.generate(prompts[0], max_tokens=4, json_schema=SCHEMA)  # compile and warm up
        for label, arms in (("positive (guided)", None), ("off (base alone)", OFF)):
            runs: dict = {"free": [], "json": []}
            for kind in ("free", "json", "json", "free"):
                runs[kind].append(one_run(model, prompts, args,
                                          SCHEMA if kind == "json" else None, arms))
            free = statistics.median(r["tokens_s"] for r in runs["free"])
            for kind in ("free", "json"):
                rs = runs[kind]
                rate = statistics.median(r["tokens_s"] for r in rs)
                print(f"| {label} | {kind} | {rate:.1f} "
                      f"| {statistics.median(r['step_ms'] for r in rs):.2f} "
                      f"| {statistics.median(r['mask_ms'] for r in rs):.3f} "
                      f"| {rate / free:.2f} |", flush=True)


def mask_share(args) -> None:
    print("\n## The mask's share of a step on a 151,936-token vocabulary (qwen-coder-0.5b)\n")
    prompts = PROMPTS[:args.prompts]
    with edge_genarm.load(base="@qwen-coder-0.5b", parallel=16, threads=args.threads,
                          ctx_size=512) as model:
        model.generate(prompts[0], max_tokens=4, json_schema=SCHEMA)
        r = one_run(model, prompts, args, SCHEMA, None)
    share = r["mask_ms"] / (r["mask_ms"] + r["step_ms"])
    print("| requests | generated tokens/s | step ms/token | mask ms/token | mask share |")
    print("|---|---|---|---|---|")
    print(f"| {len(prompts)} | {r['tokens_s']:.1f} | {r['step_ms']:.2f} | {r['mask_ms']:.3f} "
          f"| {share:.1%} |", flush=True)


async def _traffic(url: str, model: str | None, prompts: list[str], max_tokens: int) -> dict:
    async def one(http: httpx.AsyncClient, i: int, prompt: str) -> int:
        body = {"model": model, "temperature": 0.8, "seed": i, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "record", "schema": SCHEMA}}}
        reply = (await http.post(f"{url}/v1/chat/completions", json=body)).raise_for_status()
        data = reply.json()
        choice = data["choices"][0]
        if choice["finish_reason"] == "stop":
            json.loads(choice["message"]["content"])
        return data["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600,
                                 limits=httpx.Limits(max_connections=len(prompts) + 4)) as http:
        if model is None:  # the name the server gives its model
            model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        await one(http, 0, prompts[0])  # warm-up
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*[one(http, i, p) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t0
    return {"tokens_s": sum(tokens) / wall, "tokens": sum(tokens)}


def side_by_side(args) -> None:
    if not args.llama_server:
        print("\n(server section skipped: pass --llama-server PATH)")
        return
    gguf = str(resolve_model("@smollm2-q8"))
    prompts = PROMPTS[:args.prompts]
    threads = str(args.threads or 2)
    n = len(prompts)
    servers = {
        "llama-server": [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "-np", str(n),
                         "-c", str(512 * n), "-t", threads, "--no-webui"],
        "edge-genarm": [sys.executable, "-m", "edge_genarm", "serve", "--base", gguf,
                        "--parallel", str(n), "--ctx-size", "512", "--threads", threads,
                        "--host", "127.0.0.1"]}
    print(f"\n## Servers side by side: {n} concurrent JSON-schema chat requests, "
          "SmolLM2-135M Q8_0\n")
    print("| server | generated tokens/s | tokens |")
    print("|---|---|---|")
    rates = {}
    for name, command in servers.items():
        with server(command, "/health") as url:
            r = asyncio.run(_traffic(url, None, prompts, args.max_tokens))
        rates[name] = r["tokens_s"]
        print(f"| {name} | {r['tokens_s']:.1f} | {r['tokens']} |", flush=True)
    print(f"\nedge-genarm / llama-server: {rates['edge-genarm'] / rates['llama-server']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default="batch,mask,server")
    parser.add_argument("--llama-server", default=None, help="a llama-server binary")
    args = parser.parse_args()
    print_header()
    sections = args.sections.split(",")
    if "batch" in sections:
        batch(args)
    if "mask" in sections:
        mask_share(args)
    if "server" in sections:
        side_by_side(args)


if __name__ == "__main__":
    main()

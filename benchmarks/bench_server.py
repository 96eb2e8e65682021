"""Serving under load: edge-genarm's server against llama-cpp-python's own, side by side.

Three servers on the demo preset's base (SmolLM2-135M-Instruct, Q8_0), one after another on this
machine, each driven by C concurrent streaming clients (C = 1, 4, 16 by default), every client
sending `--requests-per-client` greedy chat requests of `--max-tokens` back to back:

- llama-cpp-python: `python -m llama_cpp.server` on the same GGUF, unguided (it serves one
  request at a time);
- edge-genarm unguided: `edge-genarm serve --preset demo --parallel 16`, every request with
  `"arms": {"positive": 0, "concise": 0}` (the base alone);
- edge-genarm guided: the same server, the preset's weights (the `positive` LoRA ARM at 1).

It prints requests/s, generated tokens/s (content chunks, one per token, counted the same way
for both servers: llama-cpp-python's stream has no usage chunk) and time to first token (from
sending to the first chunk with content: median and 90th percentile), then the two ratios the
targets name. Traffic goes to 127.0.0.1 only.

    pip install pydantic-settings starlette-context   # llama-cpp-python's server extras
    python -m benchmarks.bench_server [--clients 1,4,16] [--max-tokens 64]
                                      [--requests-per-client 4] [--threads N] [--quick]
                                      [--n-gpu-layers -1] [--parallel N]

--n-gpu-layers goes to both servers (llama-cpp-python's needs a GPU build for it), --parallel to
edge-genarm's (default: the most clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from edge_genarm.serve.launch import ServerStartError, local_server
from edge_genarm.registry import resolve_model

PROMPTS = ["Give me three tips for a good morning.", "What is a healthy breakfast?",
           "How do I start running?", "Explain rain to a child.", "Name three board games.",
           "How can I sleep better?", "What should I pack for a picnic?",
           "Suggest a name for a cat.", "How do plants drink water?", "Why do we yawn?",
           "Describe a calm evening.", "How do I make tea?", "What is a good hobby?",
           "Tell me about the moon.", "How do I keep a plant alive?", "What is kindness?"]
OFF = {"positive": 0.0, "concise": 0.0}


@contextmanager
def server(command: list[str], ready_path: str, stop_timeout: float = 30):
    """A server subprocess on a free loopback port, until `ready_path` answers 200."""
    try:
        with local_server(command, ready_path, timeout=300, cwd=ROOT,
                          stop_timeout=stop_timeout) as url:
            yield url
    except ServerStartError as e:
        raise SystemExit(str(e)) from None


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(time to first content, content chunks: the tokens that carried text)."""
    t0 = time.perf_counter()
    first, chunks = None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
    return (first or time.perf_counter()) - t0, chunks


async def load(url: str, clients: int, per_client: int, max_tokens: int,
               arms: dict | None) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    async def client(c: int, http: httpx.AsyncClient) -> list:
        out = []
        for i in range(per_client):
            body = {"model": "demo", "temperature": 0, "max_tokens": max_tokens, "stream": True,
                    "messages": [{"role": "user",
                                  "content": PROMPTS[(c * per_client + i) % len(PROMPTS)]}]}
            if arms is not None:
                body["arms"] = arms
            out.append(await one_request(http, url, body))
        return out

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[client(c, http) for c in range(clients)])
        wall = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    ttft = sorted(r[0] for r in flat)
    return {"requests_s": len(flat) / wall, "tokens_s": sum(r[1] for r in flat) / wall,
            "ttft_median": statistics.median(ttft),
            "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]}


def measure(name: str, url: str, args, arms: dict | None, rows: dict) -> None:
    asyncio.run(load(url, 1, 1, 8, arms))  # warm-up: first-call costs stay out of the table
    for clients in args.clients:
        r = asyncio.run(load(url, clients, args.requests_per_client, args.max_tokens, arms))
        rows[(name, clients)] = r
        print(f"| {name} | {clients} | {r['requests_s']:.2f} | {r['tokens_s']:.1f} "
              f"| {r['ttft_median'] * 1e3:.0f} | {r['ttft_p90'] * 1e3:.0f} |", flush=True)


def edge_genarm_command(parallel: int, threads: int, n_gpu_layers: int = 0) -> list[str]:
    """`edge-genarm serve` on the demo preset, loopback only (`local_server` adds the port)."""
    return [sys.executable, "-m", "edge_genarm", "serve", "--preset", "demo", "--parallel",
            str(parallel), "--ctx-size", "2048", "--threads", str(threads), "--max-queue", "256",
            "--n-gpu-layers", str(n_gpu_layers), "--host", "127.0.0.1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients, 2 requests each")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers on the GPU, both "
                    "servers (-1: all)")
    ap.add_argument("--parallel", type=int, default=0,
                    help="edge-genarm's parallel sequences (0: the most clients)")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests_per_client = "1,4", 2
    args.clients = [int(c) for c in args.clients.split(",")]
    top = max(args.clients)
    base = resolve_model("@smollm2-q8")
    threads = os.cpu_count() if args.threads == 0 else args.threads
    print_header()
    print(f"base {base.name}; {args.requests_per_client} greedy streamed requests per client, "
          f"at most {args.max_tokens} tokens each; threads {threads}; "
          f"GPU layers {args.n_gpu_layers}")
    print("| server | clients | requests/s | generated tokens/s | TTFT median ms | TTFT p90 ms |")
    print("|---|---|---|---|---|---|")
    rows: dict = {}
    theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(base), "--n_ctx", "2048",
              "--n_threads", str(threads), "--n_threads_batch", str(threads),
              "--model_alias", "demo", "--verbose", "False",
              "--n_gpu_layers", str(args.n_gpu_layers),
              # queue concurrent requests rather than cut the running stream (its default)
              "--interrupt_requests", "False"]
    with server(theirs, "/v1/models") as url:
        measure("llama-cpp-python", url, args, None, rows)
    ours = edge_genarm_command(args.parallel or top, threads, args.n_gpu_layers)
    with server(ours, "/health") as url:
        measure("edge-genarm unguided", url, args, OFF, rows)
        measure("edge-genarm guided", url, args, None, rows)
    ratio = rows[("edge-genarm unguided", top)]["tokens_s"] / \
        rows[("llama-cpp-python", top)]["tokens_s"]
    scale = rows[("edge-genarm guided", top)]["tokens_s"] / \
        rows[("edge-genarm guided", min(args.clients))]["tokens_s"]
    print(f"edge-genarm unguided / llama-cpp-python at {top} clients: {ratio:.2f}x (target 2x)")
    print(f"edge-genarm guided at {top} clients / at {min(args.clients)}: {scale:.2f}x "
          "(target 1.6x)")


if __name__ == "__main__":
    main()

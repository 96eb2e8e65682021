"""edge-genarm on Ray against one process, on this machine: batch lines/s and serving tokens/s.

A local Ray instance (this machine's cores as its CPUs) is started for the run; every figure is
measured side by side in one run, on the demo preset (SmolLM2-135M-Instruct Q8_0 guided by the
`positive` LoRA ARM), greedy.

- batch: `--lines` prompts of `--max-tokens` through the Python API, model load excluded:
  one process with 1 thread; Ray with 1 worker of 1 thread (the difference per line is Ray's
  overhead); one process with all the cores' threads; Ray with one worker per core, 1 thread
  each. Each continuous batch holds `--n-parallel` sequences.
- per-line overhead alone: the same lines with 1 token each, one process against 1 worker.
- serve: `--clients` concurrent streaming clients (bench_server's load) against the
  single-process server with all cores' threads, Ray Serve with 1 replica of all the threads,
  and Ray Serve with one replica per core of 1 thread each.

    pip install 'edge-genarm[cluster]'
    python -m benchmarks.bench_cluster [--lines 32] [--max-tokens 48] [--n-parallel 4]
                                       [--clients 16] [--requests-per-client 2]
                                       [--skip-serve] [--skip-batch]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import ray
from ray import serve as ray_serve

import edge_genarm
from benchmarks.bench_server import load as client_load
from benchmarks.bench_server import server
from benchmarks.machine import print_header

TOPICS = ["the sea", "a library", "bread", "the moon", "a bicycle", "rain", "tea", "a garden",
          "winter", "a train", "music", "a market", "snow", "the desert", "a river", "owls"]


def lines(n: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(n)]


def batch_rate(prompts: list[str], max_tokens: int, parallel: int, threads: int,
               workers: int | None) -> tuple[float, float]:
    """(lines/s, tokens/s) of one batch call, the models already loaded."""
    ray_options = {} if workers is None else {"ray": True, "workers": workers}
    with edge_genarm.load("demo", threads=threads, parallel=parallel, greedy=True,
                          **ray_options) as model:
        model.generate_batch(prompts[:1], max_tokens=2)  # warm-up, out of the timing
        t0 = time.perf_counter()
        tokens = sum(c.results[0].usage.completion_tokens
                     for c in model.as_completed(prompts, max_tokens=max_tokens))
        wall = time.perf_counter() - t0
    return len(prompts) / wall, tokens / wall


def batch_section(args, cores: int) -> None:
    prompts = lines(args.lines)
    print(f"\nbatch: {len(prompts)} lines, at most {args.max_tokens} tokens, "
          f"--n-parallel {args.n_parallel}")
    print("| run | workers x threads | lines/s | tokens/s |")
    print("|---|---|---|---|")
    runs = [("one process", None, 1), ("Ray", 1, 1), ("one process", None, cores),
            ("Ray", cores, 1)]
    rates = {}
    for name, workers, threads in runs:
        rate = batch_rate(prompts, args.max_tokens, args.n_parallel, threads, workers)
        rates[(name, workers or 1, threads)] = rate
        print(f"| {name} | {workers or 1} x {threads} | {rate[0]:.2f} | {rate[1]:.1f} |",
              flush=True)
    one, ray1 = rates[("one process", 1, 1)][0], rates[("Ray", 1, 1)][0]
    print(f"Ray with 1 worker / one process, 1 thread: {ray1 / one:.2f}x; "
          f"{(1 / ray1 - 1 / one) * 1e3:.1f} ms more per line")
    whole, spread = rates[("one process", 1, cores)][0], rates[("Ray", cores, 1)][0]
    print(f"Ray with {cores} workers x 1 thread / one process with {cores} threads: "
          f"{spread / whole:.2f}x")
    short_one = batch_rate(prompts, 1, args.n_parallel, 1, None)[0]
    short_ray = batch_rate(prompts, 1, args.n_parallel, 1, 1)[0]
    print(f"1-token lines: one process {short_one:.1f} lines/s, Ray 1 worker "
          f"{short_ray:.1f} lines/s: {(1 / short_ray - 1 / short_one) * 1e3:.1f} ms of Ray "
          "per line")


def serve_section(args, cores: int, address: str) -> None:
    clients = args.clients
    print(f"\nserve: {clients} streaming clients, {args.requests_per_client} requests each, "
          f"at most {args.max_tokens} tokens")
    print("| server | replicas x threads | requests/s | tokens/s | TTFT median ms |")
    print("|---|---|---|---|---|")
    base = [sys.executable, "-m", "edge_genarm", "serve", "--preset", "demo", "--ctx-size",
            "2048", "--max-queue", "256", "--host", "127.0.0.1"]
    runs = [("one process", None, cores), ("Ray Serve", 1, cores), ("Ray Serve", cores, 1)]
    rows = {}
    for name, replicas, threads in runs:
        per = clients if replicas is None else -(-clients // replicas)
        command = base + ["--threads", str(threads), "--parallel", str(per)]
        if replicas is not None:
            command += ["--ray", address, "--replicas", str(replicas)]
        try:
            # a Ray Serve server takes its replicas down before it exits: wait for that
            with server(command, "/health", stop_timeout=30 if replicas is None else 180) as url:
                if replicas is not None:
                    _wait_replicas(url, replicas)
                asyncio.run(client_load(url, 1, 1, 4, None))  # warm-up
                r = asyncio.run(client_load(url, clients, args.requests_per_client,
                                            args.max_tokens, None))
        finally:
            if replicas is not None:
                # should it still be killed before its teardown ends, its replicas would
                # hold the cluster's CPUs and the next run's could never be placed
                ray_serve.shutdown()
        rows[(name, replicas or 1)] = r
        print(f"| {name} | {replicas or 1} x {threads} | {r['requests_s']:.2f} "
              f"| {r['tokens_s']:.1f} | {r['ttft_median'] * 1e3:.0f} |", flush=True)
    single = rows[("one process", 1)]["tokens_s"]
    for replicas in (1, cores):
        print(f"Ray Serve {replicas} replica(s) / one process at {clients} clients: "
              f"{rows[('Ray Serve', replicas)]['tokens_s'] / single:.2f}x")


def _wait_replicas(url: str, n: int, timeout: float = 300) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        if text.count("edge_genarm_kv_cells{") >= n + 1:  # and the total
            return
        time.sleep(1)
    raise SystemExit(f"{n} replicas did not come up in {timeout:g} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n-parallel", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print_header()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        print(f"Ray {ray.__version__}: a local instance of {cores} CPUs")
        if not args.skip_batch:
            batch_section(args, cores)
        if not args.skip_serve:
            serve_section(args, cores, ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

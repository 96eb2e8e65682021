"""GPU against CPU: guided decoding speed with every model on the GPU, side by side with the same
settings on the CPU (all cores), in one bounded run.

On the demo preset's base (SmolLM2-135M-Instruct, Q8_0) and its `positive` ARM (a LoRA of the
base, alpha 1), greedy, every answer exactly --tokens tokens (end of generation masked, prefill
not timed: scoring.decode_speed, after a short warm-up run), the median of --repeats runs:

1. demo: one request, unguided and guided tokens/s;
2. batch: K = 1, 2, 4, ..., 64 parallel sequences (n_seq_max = K), guided, aggregate and
   per-sequence tokens/s (the CPU side stops at --cpu-max-k);
3. placement: the base on the GPU with the ARM on the CPU (the base file + the LoRA as a model
   of its own, ArmSpec n_gpu_layers=0) against both on the GPU, at K = 1 and K = 16;
4. PARGS-G: candidates scored in one batched decode against one decode per candidate
   (bench_rgtg.batched_against_sequential, reward model demo/positive_rm.gguf);
5. server: `edge-genarm serve --preset demo` (bench_server), 16 and 64 concurrent streaming
   clients, unguided and guided, on 127.0.0.1 at a free port.

--max-k caps every section's parallel sequences, clients and PARGS prompts. Each section has a
share of --budget-s (time a section leaves over goes to the next ones) and prints what it
skipped when its time is up; a section that fails prints its error and the run goes on. The
figures go to --json as well, written again after every section.

    python -m benchmarks.bench_gpu --n-gpu-layers -1 --json gpu.json [--budget-s 420] [--no-cpu]
    python -m benchmarks.bench_gpu --n-gpu-layers 0 --no-cpu --tokens 8 --max-k 2 \\
        --budget-s 120 --json /tmp/b.json      # a quick check of the script on a CPU-only build
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import bench_rgtg
from benchmarks import bench_server
from benchmarks.machine import cores, cpu_name, describe
from benchmarks.scoring import decode_speed
from edge_genarm import llama
from edge_genarm.engine import ArmSpec, Engine, EngineConfig, RewardSpec
from edge_genarm.generation import encode_prompt
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry

DEMO = ROOT / "edge_genarm" / "demo"  # the shipped reward models
DEMO_DATA = ROOT / "recipes" / "demo"  # the prompts the demo ARMs were not trained on
PROMPTS = (DEMO_DATA / "held_out_prompts.txt").read_text().splitlines()
KS = (1, 2, 4, 8, 16, 32, 64)
# each section's share of the time budget (a share left over flows to the sections after it)
SHARES = {"demo": 1.0, "batch": 3.0, "placement": 1.5, "pargs": 1.5, "server": 3.0}


class Clock:
    """The run's deadline, and the current section's."""

    def __init__(self, seconds: float, out: dict):
        self.t0 = time.monotonic()
        self.end = self.t0 + seconds
        self.shares = dict(SHARES)
        self.section_end = self.end
        self.out = out

    def start(self, name: str) -> None:
        share = self.shares.pop(name)
        now = time.monotonic()
        left = max(0.0, self.end - now)
        self.section_end = now + left * share / (share + sum(self.shares.values()))

    def over(self, first: bool = False) -> bool:
        """Whether the section's time is up; for its first item, the whole run's (so that every
        section gives a figure while the budget lasts)."""
        return time.monotonic() >= (self.end if first else self.section_end)

    def skip(self, what: str) -> None:
        print(f"  skipped (time budget): {what}")
        self.out["skipped"].append(what)

    def each(self, items, label: str):
        """The items, until the section's time is up; then one line names those skipped."""
        items = list(items)
        for i, item in enumerate(items):
            if self.over(first=i == 0):
                show = (f"{x[0]} ngl {x[1]}" if isinstance(x, tuple) else str(x)
                        for x in items[i:])
                self.skip(f"{label} " + ", ".join(show))
                return
            yield item


@dataclass
class Run:
    args: argparse.Namespace
    base: Path
    positive: Path
    sides: list  # (name, GPU layers): ("GPU", --n-gpu-layers) first, then ("CPU", 0)
    clock: Clock
    out: dict = field(default_factory=dict)

    def engine(self, ngl: int, k: int, arms: list, reward: RewardSpec | None = None) -> Engine:
        settings = ContextSettings(n_ctx=self.args.tokens + 256, n_seq_max=k,
                                   n_threads=self.args.threads)
        return Engine.load(EngineConfig(self.base, arms, settings, n_gpu_layers=ngl,
                                        reward=reward))

    def lora_arm(self) -> ArmSpec:
        return ArmSpec(self.positive, 1.0, "positive")

    def tok_s(self, engine: Engine, k: int, weight: float) -> float:
        """Aggregate decode tokens/s of k requests, every ARM at `weight` (median of runs)."""
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(k)]
        decode_speed(engine, texts, weight, max(2, min(8, self.args.tokens // 4)))  # warm-up
        return statistics.median(decode_speed(engine, texts, weight, self.args.tokens)
                                 for _ in range(self.args.repeats))


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def row(*cells) -> None:
    print("| " + " | ".join(fmt(c) for c in cells) + " |")


def sec_demo(run: Run) -> None:
    res = run.out["demo"] = {}
    row("side", "weights in", "unguided tok/s", "guided tok/s", "guided / unguided")
    row(*["---"] * 5)
    for name, ngl in run.clock.each(run.sides, "demo:"):
        with run.engine(ngl, 1, [run.lora_arm()]) as engine:
            where = engine.model.describe_buffers()
            unguided, guided = run.tok_s(engine, 1, 0.0), run.tok_s(engine, 1, 1.0)
        res[name] = {"ngl": ngl, "weights": where, "unguided_tok_s": unguided,
                     "guided_tok_s": guided, "ratio": guided / unguided}
        row(f"{name} (ngl {ngl})", where, unguided, guided, f"{guided / unguided:.2f}")


def sec_batch(run: Run) -> None:
    a = run.args
    res = run.out["batch"] = []
    names = [n for n, _ in run.sides]
    row("K", *[f"{n} {c}" for n in names for c in ("tok/s", "tok/s per seq")],
        *(["GPU / CPU"] if len(names) > 1 else []))
    row(*["---"] * (1 + 2 * len(names) + (len(names) > 1)))
    for k in run.clock.each([k for k in KS if k <= a.max_k], "batch: K ="):
        cells = {}
        for name, ngl in run.sides:
            if name == "CPU" and k > a.cpu_max_k:
                continue
            with run.engine(ngl, k, [run.lora_arm()]) as engine:
                cells[name] = run.tok_s(engine, k, 1.0)
        res.append({"k": k, **{f"{n.lower()}_tok_s": v for n, v in cells.items()}})
        ratio = [f"{cells['GPU'] / cells['CPU']:.2f}" if "CPU" in cells else "-"] \
            if len(names) > 1 else []
        row(k, *[x for n in names for x in (cells.get(n), cells[n] / k if n in cells else None)],
            *ratio)


def sec_placement(run: Run) -> None:
    a = run.args
    res = run.out["placement"] = []
    gpu = run.sides[0][1]
    split = ArmSpec(run.base, 1.0, "positive", adapter=run.positive, n_gpu_layers=0)
    cpu_rows = {r["k"]: r.get("cpu_tok_s") for r in run.out.get("batch", [])}
    row("K", f"base + ARM at ngl {gpu}", f"base at ngl {gpu}, ARM on CPU", "split / both",
        "both on CPU (batch table)", "ARM weights in")
    row(*["---"] * 6)
    for k in run.clock.each(sorted({min(k, a.max_k) for k in (1, 16)}), "placement: K ="):
        with run.engine(gpu, k, [run.lora_arm()]) as engine:
            both = run.tok_s(engine, k, 1.0)
        with run.engine(gpu, k, [split]) as engine:
            where = engine.arms[0].context.model.describe_buffers()
            apart = run.tok_s(engine, k, 1.0)
        res.append({"k": k, "both_gpu_tok_s": both, "arm_cpu_tok_s": apart,
                    "both_cpu_tok_s": cpu_rows.get(k), "arm_weights": where})
        row(k, both, apart, f"{apart / both:.2f}", cpu_rows.get(k), where)


def sec_pargs(run: Run) -> None:
    a = run.args
    res = run.out["pargs"] = {}
    prompts_n = min(a.pargs_prompts, a.max_k)
    ns = argparse.Namespace(candidates=a.candidates, compare_prompts=prompts_n,
                            max_tokens=min(a.pargs_tokens, a.tokens))
    reward = RewardSpec(DEMO / "positive_rm.gguf", a.candidates)
    print(f"PARGS-G (greedy), k = {a.candidates} candidates, {prompts_n} prompts decoded "
          f"together, at most {ns.max_tokens} tokens; each way twice, interleaved (median); "
          "tokens/s include prefill")
    for name, ngl in run.clock.each(run.sides, "PARGS:"):
        with run.engine(ngl, prompts_n, [], reward=reward) as engine:
            prompts = [encode_prompt(engine, t) for t in PROMPTS[:prompts_n]]
            print(f"{name} (ngl {ngl}):", end="")
            res[name] = {"ngl": ngl, **bench_rgtg.batched_against_sequential(engine, prompts, ns)}
    if res:
        print()
        row("side", "batched tok/s", "one decode per candidate tok/s", "speedup", "identical")
        row(*["---"] * 5)
        for name, r in res.items():
            row(f"{name} (ngl {r['ngl']})", r["batched_tok_s"], r["sequential_tok_s"],
                f"{r['speedup']:.2f}", f"{r['identical']}/{r['prompts']}")


def sec_server(run: Run) -> None:
    a = run.args
    res = run.out["server"] = []
    clients = sorted({min(c, a.max_k) for c in a.clients})
    sargs = argparse.Namespace(clients=clients, requests_per_client=a.requests_per_client,
                               max_tokens=min(a.server_tokens, a.tokens))
    print(f"edge-genarm serve --preset demo --parallel {max(clients)}; clients {clients}, "
          f"{a.requests_per_client} greedy streamed requests each, at most {sargs.max_tokens} "
          "tokens; unguided: both ARMs at 0, guided: the preset's weights")
    print("| server | clients | requests/s | generated tokens/s | TTFT median ms | TTFT p90 ms |")
    print("|---|---|---|---|---|---|")
    threads = a.threads or llama.default_threads()
    for name, ngl in run.clock.each(run.sides, "server:"):
        cmd = bench_server.edge_genarm_command(max(clients), threads, ngl)
        rows: dict = {}
        try:
            with bench_server.server(cmd, "/health") as url:
                bench_server.measure(f"{name} ngl {ngl} guided", url, sargs, None, rows)
                if run.clock.over(first=name == run.sides[0][0]):
                    run.clock.skip(f"server: {name} unguided")
                else:
                    bench_server.measure(f"{name} ngl {ngl} unguided", url, sargs,
                                         bench_server.OFF, rows)
        finally:
            res += [{"side": name, "ngl": ngl, "setting": s.rsplit(" ", 1)[1], "clients": c, **r}
                    for (s, c), r in rows.items()]


SECTIONS = {"demo": ("Demo preset, one request", sec_demo),
            "batch": ("Batch scaling, guided", sec_batch),
            "placement": ("Per-ARM placement, guided", sec_placement),
            "pargs": ("PARGS: batched against sequential candidate scoring", sec_pargs),
            "server": ("Server throughput", sec_server)}


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "none (no nvidia-smi)"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20)
        return done.stdout.strip().replace("\n", "; ") or f"unknown ({done.stderr.strip()})"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def header(out: dict) -> None:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    out["machine"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_name(), "cpu": cpu_name(), "cores": cores(), "summary": describe(),
        "llama_cpp_version": llama_cpp.__version__, "llama_system_info": info,
        "gpu_offload": llama.supports_gpu_offload()}
    m = out["machine"]
    print(f"date: {m['date']}\nGPU: {m['gpu']}\nCPU: {m['cpu']}, {m['cores']}\n{m['summary']}\n"
          f"llama.cpp system info: {info}\nllama.cpp GPU offload: {m['gpu_offload']}")


def write_json(path: Path | None, out: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
    tmp.replace(path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-gpu-layers", type=int, default=-1, help="the GPU side's layers (-1: all)")
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True,
                    help="also the CPU side (ngl 0, all cores)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per context, both "
                    "sides (0: all cores)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per answer (demo, batch, "
                    "placement); also caps PARGS's and the server's answers")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per figure (median)")
    ap.add_argument("--max-k", type=int, default=64, help="most parallel sequences, any section")
    ap.add_argument("--cpu-max-k", type=int, default=16, help="the CPU side's largest batch K")
    ap.add_argument("--candidates", type=int, default=10, help="PARGS candidates per token")
    ap.add_argument("--pargs-prompts", type=int, default=4)
    ap.add_argument("--pargs-tokens", type=int, default=32)
    ap.add_argument("--clients", default="16,64", help="server: concurrent clients")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--server-tokens", type=int, default=32)
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; the sections are {', '.join(SECTIONS)}")
    return args


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    args = parse_args()
    if args.n_gpu_layers != 0 and not llama.supports_gpu_offload():
        raise SystemExit(f"bench_gpu.py: --n-gpu-layers {args.n_gpu_layers} needs a llama-cpp-"
                         "python build with GPU support, and this one has none; install a CUDA "
                         "build, or check the script with --n-gpu-layers 0")
    out: dict = {"settings": vars(args), "skipped": [], "errors": {}, "seconds": {}}
    clock = Clock(args.budget_s, out)
    header(out)
    try:
        reg = Registry.load()
        preset = reg.preset("demo")
        base = reg.resolve(preset.base)
        positive = reg.resolve(next(a for a in preset.arms if a.name == "positive").model)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"bench_gpu.py: the demo preset's models: {type(e).__name__}: {e}")
    sides = [("GPU", args.n_gpu_layers)] + ([("CPU", 0)] if args.cpu else [])
    run = Run(args, base, positive, sides, clock, out)
    print(f"demo preset: {base.name} + LoRA ARM {positive.name} (alpha 1); greedy; "
          f"{args.tokens} tokens per answer (end of generation masked, prefill not timed); "
          f"median of {args.repeats}; threads {args.threads or llama.default_threads()}; sides: "
          + ", ".join(f"{n} ngl {g}" for n, g in sides) + f"; budget {args.budget_s:g} s")
    for i, (name, (title, fn)) in enumerate(SECTIONS.items(), 1):
        if name not in args.sections:
            continue
        clock.start(name)
        print(f"\n## {i}. {title} ({clock.section_end - time.monotonic():.0f} s of the "
              "budget)")
        t0 = time.monotonic()
        try:
            fn(run)
        except (Exception, SystemExit) as e:  # noqa: BLE001  one section's failure ends it only
            print(f"{name}: FAILED: {type(e).__name__}: {e}".rstrip())
            traceback.print_exc(limit=-4, file=sys.stderr)
            out["errors"][name] = f"{type(e).__name__}: {e}"
        out["seconds"][name] = round(time.monotonic() - t0, 1)
        write_json(args.json, out)
    total = time.monotonic() - clock.t0
    out["seconds"]["total"] = round(total, 1)
    write_json(args.json, out)
    print(f"\ndone in {total:.0f} s; skipped: {len(out['skipped'])}; failed sections: "
          f"{', '.join(out['errors']) or 'none'}" + (f"; figures in {args.json}" if args.json
                                                    else ""))


if __name__ == "__main__":
    main()

"""Every benchmark runs: its --help, and one tiny run with its real models, as
`python -m benchmarks.NAME` from the repository's root (the way docs/results.md runs them).

A tiny run checks that the script still fits the package it measures (a refactor that breaks a
benchmark fails here), not its figures: those are measured on a quiet machine and recorded in
docs/results.md. Each run must exit 0 and print its `machine:` line (the scripts that have one)
and a table or figure line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                    if p.stem.startswith(("bench_", "gpu_")))

# The smallest run of each that still goes through all of its code paths that a CPU can take.
TINY = {
    "bench_alignment": ["--prompts", "2", "--max-tokens", "6", "--seeds", "1",
                        "--settings", "0:0,1:0"],
    "bench_batch": ["--max-tokens", "4", "--skip-types", "--skip-curve", "--prompts", "2"],
    "bench_cluster": ["--lines", "2", "--max-tokens", "2", "--clients", "2",
                      "--requests-per-client", "1"],
    "bench_candidates": ["--prompts", "1", "--tokens", "3", "--candidates", "4"],
    "bench_chat": ["--turns", "2", "--max-tokens", "4", "--repeats", "1"],
    "bench_convert": ["--tiny", "--quantize", "Q8_0"],
    "bench_exact": ["--types", "F32", "--tokens", "6"],
    "bench_gpu": ["--n-gpu-layers", "0", "--no-cpu", "--sections", "demo", "--tokens", "4",
                  "--repeats", "1", "--budget-s", "60"],
    "bench_guided": ["--tokens", "4", "--repeats", "1", "--threads", "1", "--sections", "speed"],
    "bench_pairs": ["--objectives", "concise", "--max-length", "96", "--pairs", "4"],
    "bench_preset_defaults": ["--prompts", "1", "--seeds", "1", "--max-tokens", "4",
                              "--setting", "base=--alpha positive=0"],
    "bench_quant": ["--types", "Q8_0", "--texts", "1"],
    "bench_reference": ["--pairs", "smollm2", "--prompts", "1", "--tokens", "4"],
    "bench_repack": ["--models", "@smollm2-q8", "--tokens", "4", "--prefill", "16",
                     "--repeats", "1"],
    "bench_reward_models": ["--prompts", "2", "--samples", "3", "--max-tokens", "6"],
    "bench_rgtg": ["--prompts", "1", "--max-tokens", "4", "--alphas", "1", "--weights", "1",
                   "--samples", "2", "--candidates", "2", "--parallel", "2",
                   "--compare-prompts", "1"],
    # its demo and coder sections run in test_search_plots_redraw_from_a_save
    "bench_search": ["--sections", "speed", "--speed-widths", "2", "--speed-tokens", "4"],
    "bench_server": ["--clients", "1", "--requests-per-client", "1", "--max-tokens", "4"],
    "bench_speculative": ["--preset", "demo", "--task", "rewrite", "--prompts", "1",
                          "--max-tokens", "4", "--temperatures", "0", "--parallel", "1",
                          "--draft-model", "@smollm2", "--verify-sizes", "1,2"],
    "bench_structured": ["--sections", "batch,server", "--prompts", "2", "--max-tokens", "4"],
    "bench_thread_mix": ["--parallel", "2", "--max-tokens", "2", "--repeats", "1"],
    "bench_weak_to_strong": ["--weights", "1", "--requests", "1", "--max-tokens", "4",
                             "--speed-tokens", "4", "--no-small", "--parallel", "1"],
    "gpu_import_order": [],
}


def run(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the benchmarks package, from any folder
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_every_benchmark_has_a_tiny_run():
    assert sorted(TINY) == BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help(name):
    res = run(name, "--help", timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:") and "--help" in res.stdout


@pytest.mark.parametrize("name", BENCHMARKS)
def test_tiny_run(name):
    res = run(name, *TINY[name])
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    out = res.stdout
    if name == "gpu_import_order":
        # every variant ran to its end and decoded (a crash would exit 1, and show here)
        from benchmarks.gpu_import_order import VARIANTS
        lines = out.splitlines()
        for variant, *_ in VARIANTS:
            assert f"{variant:55s} exit 0" in lines, (variant, out[-2000:])
        assert f"{len(VARIANTS)} of {len(VARIANTS)} variants decoded" in out, out[-2000:]
        return
    assert "|" in out or "tok/s" in out, out[-2000:]
    if name == "bench_thread_mix" and len(os.sched_getaffinity(0)) > 1:
        # the main thread's idle OpenMP pool is there when kept and gone when released, as in a
        # fresh process (with one core llama.cpp makes no pool)
        threads = {row.split("|")[1].strip(): int(row.split("|")[4])
                   for row in out.splitlines() if row.startswith("| ") and "variant" not in row}
        assert threads["fresh"] == threads["after a plain loop, pool released (now)"] < \
            threads["after a plain loop, pool kept (before)"], threads
    if name != "bench_gpu":
        assert out.startswith("machine:") or "\nmachine:" in out, out[:500]


def test_search_plots_redraw_from_a_save(tmp_path):
    """bench_search's demo and coder sections draw their plots and save every answer; --replot
    draws the same plots again from that file alone."""
    save, drawn = tmp_path / "answers.jsonl", {n: tmp_path / f"{n}.png" for n in
                                               ("demo", "coder", "demo2", "coder2")}
    res = run("bench_search", "--sections", "demo,coder", "--prompts", "2", "--draws", "2",
              "--fluency", "0.5", "--budgets", "2", "--max-tokens", "4", "--problems", "1", "--coder-budgets", "2",
              "--coder-max-tokens", "4", "--plot", str(drawn["demo"]),
              "--coder-plot", str(drawn["coder"]), "--save", str(save))
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "| search | 2 |" in res.stdout and "| search, segment line, K=2 |" in res.stdout
    assert "2 held-out prompts x 2 draws" in res.stdout and "arm-base + 0.5 x base" in res.stdout
    rows = save.read_text().splitlines()
    # demo: plain, best-of-2, search, each prompt twice; coder: + greedy
    assert len(rows) == 3 * 2 * 2 + 4 * 1, rows
    res = run("bench_search", "--replot", str(save), "--plot", str(drawn["demo2"]),
              "--coder-plot", str(drawn["coder2"]), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for path in drawn.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_search_ranks_by_the_presets_reward_model():
    """bench_search --score reward loads the demo preset's reward model and ranks by it."""
    res = run("bench_search", "--sections", "demo", "--prompts", "2", "--budgets", "2",
              "--max-tokens", "6", "--segment", "2", "--score", "reward", "--plot", "")
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "score reward, search segment 2" in res.stdout and "| search | 2 |" in res.stdout

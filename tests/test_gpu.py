"""GPU offload, on whatever build is installed: with a GPU build (CUDA, Metal) the guided decode on
the GPU equals the CPU's by the near-tie rule, a small ARM can stay on the CPU beside a base on
the GPU, and the server serves from the GPU (skipped, with the reason, on a CPU-only build);
with a CPU-only build every GPU option is refused with one line. Either way, a process that
imported NumPy or torch before edge-genarm loads and decodes (CUDA builds crashed at model load
in that order).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest

from edge_genarm import llama
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import resolve_model
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler
from edge_genarm.serve.launch import local_server

GPU = llama.supports_gpu_offload()
NEAR_TIE = 1.0
PROMPTS = ["Tell me about the sea.", "Three tips for a good morning:", "Why is the sky blue?"]
REFUSED = "this llama-cpp-python build has no GPU support"
# the GPU comparisons cannot run on a CPU-only build: skipped there, never passed by a refusal
needs_gpu = pytest.mark.skipif(not GPU, reason=REFUSED)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_genarm", *args], capture_output=True,
                          text=True, timeout=timeout)


def greedy(config: EngineConfig, n: int = 24) -> tuple[list[list[int]], list[list[int]], dict]:
    """Greedy tokens of PROMPTS decoded together; the prompts' ids; each model's buffers."""
    with Engine.load(config) as engine, Scheduler(engine) as scheduler:
        handles = [scheduler.submit(Request(prompt_ids=tuple(engine.model.tokenize(p, True)),
                                            max_tokens=n, ignore_eos=True,
                                            sampling=SamplingSettings(greedy=True)))
                   for p in PROMPTS]
        tokens = {id(h): [] for h in handles}
        for event in scheduler.run(handles):
            if event.token is not None:
                tokens[id(event.handle)].append(event.token)
        buffers = {"base": engine.model.buffers} | {
            a.name: a.context.model.buffers for a in engine.arms}
        return ([tokens[id(h)] for h in handles], [list(h.request.prompt_ids) for h in handles],
                buffers)


def guided_row(config: EngineConfig, ids: list[int]) -> np.ndarray:
    """The guided scores after `ids`, one sequence alone."""
    with Engine.load(config) as engine:
        seq = engine.new_sequence()
        return np.array(engine.advance([seq], [ids])).reshape(-1)


def assert_same_or_near_tie(config, ids_list, a_list, b_list):
    for ids, a, b in zip(ids_list, a_list, b_list):
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is not None:  # at the parting, the two choices are a near-tie on the CPU
            row = guided_row(config, ids + a[:d])
            assert abs(float(row[a[d]] - row[b[d]])) < NEAR_TIE, (d, a, b)


def demo_config(layers: int, arm_layers: int | None = None, full_arm: bool = False):
    base = resolve_model("@smollm2-q8")
    arm = (ArmSpec(base, 1.0, "self", n_gpu_layers=arm_layers) if full_arm
           else ArmSpec(resolve_model("@demo-positive"), 1.0, "positive"))
    return EngineConfig(base, [arm], ContextSettings(n_ctx=256, n_seq_max=len(PROMPTS)),
                        n_gpu_layers=layers)


@needs_gpu
def test_guided_decoding_on_the_gpu_equals_the_cpu():
    cpu, ids, cpu_buffers = greedy(demo_config(0))
    gpu, _, gpu_buffers = greedy(demo_config(-1))
    assert not any(k.startswith(("CUDA", "Metal")) for k in cpu_buffers["base"]), cpu_buffers
    assert any(k.startswith(("CUDA", "Metal")) for k in gpu_buffers["base"]), gpu_buffers
    assert_same_or_near_tie(demo_config(0), ids, cpu, gpu)


@needs_gpu
def test_a_small_arm_stays_on_the_cpu_beside_a_base_on_the_gpu():
    split, ids, buffers = greedy(demo_config(-1, arm_layers=0, full_arm=True))
    assert any(k.startswith(("CUDA", "Metal")) for k in buffers["base"]), buffers
    assert not any(k.startswith(("CUDA", "Metal")) for k in buffers["self"]), buffers
    on_gpu, _, _ = greedy(demo_config(-1, arm_layers=-1, full_arm=True))
    assert_same_or_near_tie(demo_config(0, full_arm=True), ids, on_gpu, split)


@pytest.mark.skipif(GPU, reason="this llama-cpp-python build has GPU support: nothing to refuse")
@pytest.mark.parametrize("args", [
    ["generate", "--preset", "demo", "-ngl", "-1", "-n", "2", "Hi"],
    ["generate", "--preset", "demo", "--arm-gpu-layers", "positive=-1", "-n", "2", "Hi"],
    ["serve", "--preset", "demo", "-ngl", "-1", "--ctx-size", "256", "--parallel", "2",
     "--port", "0"],
], ids=["generate -ngl", "generate --arm-gpu-layers", "serve -ngl"])
def test_a_cpu_only_build_refuses_every_gpu_option_in_one_line(args):
    res = run_cli(*args)
    assert res.returncode == 1 and REFUSED in res.stderr and "Traceback" not in res.stderr


IMPORT_FIRST = textwrap.dedent("""
    import sys
    for name in sys.argv[2:]:
        __import__(name)
    from edge_genarm.llama import ContextSettings, Context, Model, supports_gpu_offload
    model = Model(sys.argv[1], n_gpu_layers=-1 if supports_gpu_offload() else 0)
    ctx = Context(model, ContextSettings(n_ctx=64))
    row = ctx.decode([(0, model.tokenize("Hello there, how are you?", True), 0)])
    assert row.shape[-1] == model.n_vocab and abs(float(row.sum())) > 0
    print("decoded")
""")


@pytest.mark.parametrize("first", [["numpy"], ["torch"], ["numpy", "torch"]])
def test_a_process_that_imported_numpy_or_torch_first_loads_and_decodes(first):
    res = subprocess.run([sys.executable, "-c", IMPORT_FIRST, str(resolve_model("@smollm2-q8")),
                          *first], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "decoded" in res.stdout, (res.returncode, res.stderr[-2000:])


@needs_gpu
def test_the_server_serves_from_the_gpu():
    args = ["serve", "--preset", "demo", "-ngl", "-1", "--ctx-size", "256", "--parallel", "2"]
    with local_server([sys.executable, "-m", "edge_genarm", *args], "/health", timeout=300,
                      stop_timeout=20) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "demo", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()

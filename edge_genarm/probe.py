"""A first decode in a child process, so that a crash inside llama.cpp becomes one clear line.

Contract: `check_first_decode(config)` loads `config` (an `EngineConfig`) in a fresh interpreter
(`python -m edge_genarm.probe`, the config pickled on stdin), decodes a short prompt as one
multi-token batch on two sequences through every context (base, ARMs, reward model) and a few
greedy steps, and returns. If the child dies by a signal it raises `EngineError` naming the
signal, the CPU features llama.cpp reports and the settings to try; if it fails otherwise, the
child's own last error line. `serve` runs it before loading, so that a supervisor sees a
non-zero exit instead of a server that dies on its first request.

`EDGE_GENARM_PROBE_CRASH=segv` makes the child crash for real (CPython's own test fault, after
the models are loaded): the tests use it to check what a crash in the child becomes.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys

from .errors import EngineError, UserError

PROMPT = "Say hello in three words, then count to five."
STEPS = 4
_USER_ERROR = 3  # the child's exit status for bad input, which the parent raises as such


def check_first_decode(config, timeout: float = 600.0) -> None:
    """Raise EngineError if the models of `config` cannot decode (see the module docstring)."""
    try:
        child = subprocess.run([sys.executable, "-m", "edge_genarm.probe"],
                               input=pickle.dumps(config), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineError(f"the first decode did not finish within {timeout:.0f} s") from None
    if child.returncode == 0:
        return
    if child.returncode < 0:
        from . import llama  # the parent has not loaded llama.cpp's weights: only its info

        name = signal.Signals(-child.returncode).name
        features = " ".join(k for k, v in llama.cpu_features().items() if v == "1")
        raise EngineError(
            f"llama.cpp crashed ({name}) on the first decode of {config.base.name} with weight "
            f"repacking {config.repack}; CPU features: {features}; try --repack off "
            f"(or --n-gpu-layers 0 if the GPU is at fault)")
    lines = child.stderr.decode(errors="replace").strip().splitlines()
    message = (lines[-1].removeprefix("Error: ") if lines else
               f"the first decode failed (exit status {child.returncode})")
    raise (UserError if child.returncode == _USER_ERROR else EngineError)(message)


def _decode(config) -> None:
    from .engine import Engine
    from .scheduler import Request, Scheduler
    from .sampling import SamplingSettings

    config = dataclasses.replace(config, context=dataclasses.replace(
        config.context, n_seq_max=max(2, config.context.n_seq_max)))
    with Engine.load(config) as engine:
        if os.environ.get("EDGE_GENARM_PROBE_CRASH") == "segv":
            import faulthandler
            faulthandler._sigsegv()
        ids = engine.model.tokenize(PROMPT, True)
        method = "pargs" if engine.reward is not None else "genarm"
        with Scheduler(engine) as scheduler:
            handles = [scheduler.submit(Request(
                prompt_ids=tuple(ids[:len(ids) - i]), max_tokens=STEPS, method=method,
                sampling=SamplingSettings(greedy=True))) for i in range(2)]
            for _ in scheduler.run(handles):
                pass


def main() -> int:
    config = pickle.loads(sys.stdin.buffer.read())
    try:
        _decode(config)
    except UserError as exc:  # bad input (a file that is no model, too little memory): as is
        print(f"Error: {exc}", file=sys.stderr)
        return _USER_ERROR
    except EngineError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
